"""The door speaks vLLM's dialect: the bodies vLLM's tools send are served, vLLM's extras it
does not implement are refused by name, those it implements (min_p, the penalties, min_tokens,
logit_bias, chat_template_kwargs, continuous_usage_stats, request_id) work end to end, and
/metrics carries vLLM's families."""

from __future__ import annotations

import json
import logging

import grpc
import httpx
import openai
import pytest
from http_support import CHAT_TEMPLATE, start_live_door, with_chat_template
from prometheus_client.parser import text_string_to_metric_families

from alise.client import Client
from alise.v1 import scheduler_pb2, scheduler_pb2_grpc

MODEL = "tiny-chat"
CHAT = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def live(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    model = with_chat_template(tiny_llama_dir, tmp / "model")
    door, stop = start_live_door(str(model), tmp / "jobs.jsonl", served_model_name=MODEL)
    yield door
    stop()


def post(live, path: str, body: dict, **kwargs) -> httpx.Response:
    # json.dumps writes a lone surrogate as its escape, as a client's JSON library would.
    return httpx.post(f"{live.base_url}{path}", content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json"}, **kwargs)


def events(reply: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", reply.text[-300:]
    return [json.loads(line) for line in lines[:-1]]


# What the load generators send by default (vllm/benchmarks/lib/endpoint_request_func.py;
# guidellm's backends/openai/request_handlers.py; aiperf's endpoints/openai_*.py).
TOOL_BODIES = {
    "vllm bench serve, openai": ("/v1/completions", {
        "model": MODEL, "prompt": "the sea", "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": None,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}),
    "vllm bench serve, openai-chat": ("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "the sea"}]}],
        "max_completion_tokens": 4, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True}),
    "vllm bench serve, older": ("/v1/completions", {
        "model": MODEL, "prompt": "the sea", "temperature": 0.0, "best_of": 1, "max_tokens": 4,
        "logprobs": None, "stream": True, "ignore_eos": True}),
    "guidellm, text": ("/v1/completions", {
        "model": MODEL, "prompt": "the sea", "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": 4, "stop": None, "ignore_eos": True}),
    "guidellm, chat": ("/v1/chat/completions", {
        "model": MODEL, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_completion_tokens": 4, "stop": None, "ignore_eos": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "the sea"}]}]}),
    "aiperf, chat": ("/v1/chat/completions", {
        "messages": CHAT, "model": MODEL, "stream": True, "max_completion_tokens": 4,
        "stream_options": {"include_usage": True}, "ignore_eos": True}),
    "aiperf, completions": ("/v1/completions", {
        "prompt": ["the sea"], "model": MODEL, "stream": True, "max_tokens": 4,
        "stream_options": {"include_usage": True}}),
}


@pytest.mark.parametrize("tool", sorted(TOOL_BODIES))
def test_the_bodies_load_generators_send_are_served(live, tool):
    path, body = TOOL_BODIES[tool]
    reply = post(live, path, body)
    assert reply.status_code == 200, reply.text
    last = events(reply)[-1]
    if "stream_options" in body:
        assert last["usage"]["completion_tokens"] == 4
    else:
        assert last["choices"][0]["finish_reason"] == "length"


# (field, value, endpoints): a value that asks for something the door does not do.
REFUSED = [
    ("guided_json", {"type": "object"}, "both"), ("guided_regex", "a+", "both"),
    ("guided_choice", ["yes", "no"], "both"), ("guided_grammar", "root ::= 'a'", "both"),
    ("structured_outputs", {"json": {"type": "object"}}, "both"), ("structural_tag", "{}", "chat"),
    ("response_format", {"type": "json_object"}, "both"), ("guided_decoding_backend", "xgrammar", "both"),
    ("use_beam_search", True, "both"), ("length_penalty", 0.5, "both"),
    ("bad_words", ["sea"], "both"), ("allowed_token_ids", [1, 2], "both"),
    ("truncate_prompt_tokens", 8, "both"), ("include_stop_str_in_output", True, "both"),
    ("skip_special_tokens", False, "both"), ("spaces_between_special_tokens", False, "both"),
    ("prompt_logprobs", 1, "both"), ("top_logprobs", 2, "completions"), ("echo", True, "both"),
    ("n", 2, "both"), ("best_of", 2, "completions"),
    ("logits_processors", ["my.Processor"], "both"), ("kv_transfer_params", {"do_remote_decode": True}, "both"),
    ("vllm_xargs", {"k": 1}, "both"), ("thinking_token_budget", 10, "both"), ("stream_interval", 4, "both"),
    ("prompt_embeds", "AAAA", "completions"), ("add_special_tokens", False, "completions"),
    ("add_special_tokens", True, "chat"), ("chat_template", "{{ messages }}", "chat"),
    ("documents", [{"title": "t", "text": "x"}], "chat"), ("add_generation_prompt", False, "chat"),
    ("continue_final_message", True, "chat"), ("reasoning_effort", "low", "chat"),
    ("include_reasoning", False, "chat"), ("mm_processor_kwargs", {"fps": 1}, "chat"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "chat"), ("tool_choice", "required", "chat"),
    ("suffix", "end", "completions"), ("watermarking", True, "both"),
]
CASES = [(field, value, path) for field, value, where in REFUSED
         for path in {"both": ("/v1/completions", "/v1/chat/completions"), "chat": ("/v1/chat/completions",),
                      "completions": ("/v1/completions",)}[where]]


@pytest.mark.parametrize("field, value, path", CASES, ids=[f"{c[0]}-{c[2].split('/')[-1]}" for c in CASES])
def test_unimplemented_fields_are_refused_by_name(live, field, value, path):
    base = {"messages": CHAT} if "chat" in path else {"prompt": "the sea"}
    reply = post(live, path, {**base, "max_tokens": 2, field: value})
    assert reply.status_code == 400, (field, reply.text)
    error = reply.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == field
    assert field in error["message"] and error["type"] == "invalid_request_error"


def test_neutral_values_and_nulls_are_accepted(live):
    neutral = {"repetition_penalty": 1, "frequency_penalty": 0.0, "presence_penalty": 0, "min_tokens": 0,
               "use_beam_search": False, "length_penalty": 1.0, "bad_words": [], "skip_special_tokens": True,
               "include_stop_str_in_output": False, "guided_json": None, "structured_outputs": None,
               "n": 1, "echo": False, "add_generation_prompt": True, "add_special_tokens": False,
               "parallel_tool_calls": True, "tool_choice": "none", "session_id": "s-1", "cache_salt": "salt"}
    reply = post(live, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, **neutral})
    assert reply.status_code == 200, reply.text


def _greedy_ids(live, prompt: str, n: int) -> list[int]:
    with Client(live.address) as client:
        return client.complete(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids


def test_min_p_one_keeps_only_the_most_likely_token(live):
    greedy = _greedy_ids(live, "the lighthouse keeper", 8)
    body = {"prompt": "the lighthouse keeper", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True,
            "return_token_ids": True}
    # Random weights spread the probability: sampled without min_p, seeds part from greedy.
    plain = [post(live, "/v1/completions", {**body, "seed": s}).json()["choices"][0]["token_ids"] for s in range(3)]
    assert any(ids != greedy for ids in plain)
    for seed in range(3):
        ids = post(live, "/v1/completions", {**body, "seed": seed, "min_p": 1.0}).json()["choices"][0]["token_ids"]
        assert ids == greedy
    refused = post(live, "/v1/completions", {**body, "min_p": 1.5})
    assert refused.status_code == 400 and "min_p must be in [0, 1]" in refused.json()["error"]["message"]
    typed = post(live, "/v1/completions", {**body, "min_p": "high"})
    assert typed.status_code == 400 and "min_p must be a number" in typed.json()["error"]["message"]


def _completion_ids(live, body: dict) -> list[int]:
    reply = post(live, "/v1/completions", {"prompt": "the lighthouse keeper", "temperature": 0, "ignore_eos": True,
                                           "return_token_ids": True, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["token_ids"]


def test_a_strong_logit_bias_decides_greedy_tokens(live):
    greedy = _greedy_ids(live, "the lighthouse keeper", 6)
    token = next(t for t in range(100, 200) if t not in greedy)
    assert _completion_ids(live, {"max_tokens": 6, "logit_bias": {str(token): 100}}) == [token] * 6
    with Client(live.address) as client:  # the SDK's own argument
        sdk = client.complete("the lighthouse keeper", max_tokens=6, temperature=0, ignore_eos=True,
                              logit_bias={token: 100}).token_ids
    assert sdk == [token] * 6
    vocab = live.cluster.scheduler.servicer.info.vocab_size
    outside = post(live, "/v1/completions", {"prompt": "hi", "logit_bias": {str(vocab): 5}})
    assert outside.status_code == 400 and "logit_bias" in outside.json()["error"]["message"]


def test_penalties_change_a_greedy_output_that_repeats(live):
    greedy = _greedy_ids(live, "the lighthouse keeper", 48)
    assert len(set(greedy)) < len(greedy)  # (two tokens come back once)
    for penalty in ({"repetition_penalty": 3.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = _completion_ids(live, {"max_tokens": 48, **penalty})
        assert penalized != greedy and len(set(penalized)) > len(set(greedy)), penalty
    neutral = {"repetition_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "min_tokens": 0,
               "logit_bias": {}}
    assert _completion_ids(live, {"max_tokens": 48, **neutral}) == greedy


def test_min_tokens_holds_off_a_stop_token_id(live):
    first = _greedy_ids(live, "the lighthouse keeper", 1)[0]
    body = {"max_tokens": 8, "stop_token_ids": [first]}
    assert _completion_ids(live, body) == [first]
    held = _completion_ids(live, {**body, "min_tokens": 5})
    assert len(held) > 5 and first not in held[:5]


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
    ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3.0"),
    ("frequency_penalty", "high", "frequency_penalty must be a number, got a string"),
    ("repetition_penalty", 0, "repetition_penalty must be finite and > 0, got 0.0"),
    ("min_tokens", -1, "min_tokens must be an integer >= 0, got -1"),
    ("min_tokens", 9, "min_tokens must be at most max_tokens (8), got 9"),
    ("logit_bias", {"5": 101}, "logit_bias of token 5 must be a number in [-100, 100], got 101"),
    ("logit_bias", {"x": 1}, "logit_bias keys must be token ids (integers >= 0), got 'x'"),
    ("logit_bias", {str(i): 1 for i in range(301)}, "logit_bias has 301 entries; at most 300 are allowed"),
    ("logit_bias", [5], "logit_bias must be an object, got an array"),
])
def test_a_bad_penalty_min_tokens_or_bias_is_400_naming_it(live, field, value, message):
    for path, base in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        reply = post(live, path, {**base, "max_tokens": 8, field: value})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == field and error["message"] == message


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", 3.0, "sampling: presence_penalty must be in [-2, 2], got 3.0"),
    ("repetition_penalty", -1.0, "sampling: repetition_penalty must be finite and > 0, got -1.0"),
    ("min_tokens", 9, "sampling: min_tokens must be at most max_tokens (8), got 9"),
    ("logit_bias", {5: 200.0}, "sampling: logit_bias of token 5 must be a number in [-100, 100], got 200.0"),
])
def test_the_scheduler_refuses_bad_values_over_grpc(live, field, value, message):
    request = scheduler_pb2.GenerateRequest(text="hi")
    request.sampling.max_tokens = 8
    if field == "logit_bias":
        request.sampling.logit_bias.update(value)
    else:
        setattr(request.sampling, field, value)
    with grpc.insecure_channel(live.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == message


def test_chat_template_kwargs_reach_the_template(live):
    tokenizer = live.cluster.scheduler.servicer.info.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    counts = {}
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        reply = post(live, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": kwargs})
        assert reply.status_code == 200, reply.text
        rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, **kwargs)
        expected = len(tokenizer.encode(rendered, add_special_tokens=False))
        counts[json.dumps(kwargs)] = reply.json()["usage"]["prompt_tokens"]
        assert counts[json.dumps(kwargs)] == expected
    assert counts['{"enable_thinking": false}'] > counts["{}"] == counts['{"enable_thinking": true}']
    bad = post(live, "/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"messages": []}})
    assert bad.status_code == 400 and "may not set messages" in bad.json()["error"]["message"]


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(live):
    with openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0) as client:
        chunks = list(client.completions.create(
            model=MODEL, prompt="the sea", max_tokens=5, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    content, last = chunks[:-1], chunks[-1]
    assert [c.usage.completion_tokens for c in content] == list(range(1, 6))
    assert all(c.usage.prompt_tokens == last.usage.prompt_tokens > 0 for c in content)
    assert last.choices == [] and last.usage.completion_tokens == 5
    # include_usage alone: null in each chunk, the total at the end (OpenAI's shape).
    plain = events(post(live, "/v1/completions", {"prompt": "the sea", "max_tokens": 3, "ignore_eos": True,
                                                  "stream": True, "stream_options": {"include_usage": True}}))
    assert all(e["usage"] is None for e in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 3


def test_request_id_names_the_job_and_the_response(live):
    reply = post(live, "/v1/completions", {"prompt": "the sea", "max_tokens": 2, "request_id": "trace-42"})
    assert reply.json()["id"] == "cmpl-trace-42" and reply.headers["x-request-id"] == "trace-42"
    assert any(job["job_id"] == "trace-42" for job in live.jobs())
    bad = post(live, "/v1/completions", {"prompt": "the sea", "request_id": "a\nb"})
    assert bad.status_code == 400 and "request_id must be printable" in bad.json()["error"]["message"]


CONTEXT = 256  # the live door's max_model_len
LONG_IDS = [10 + i % 50 for i in range(250)]  # a token-id prompt 6 tokens short of the context
LONG_CHAT = [{"role": "user", "content": "word " * 230}]


def context_exceeded(num_prompt: int, max_tokens: int) -> str:
    return (f"This model's maximum context length is {CONTEXT} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.")


def assert_context_exceeded(reply: httpx.Response, num_prompt: int, max_tokens: int) -> None:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["message"] == context_exceeded(num_prompt, max_tokens)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_completion_over_the_context_is_400_as_in_vllm(live, stream):
    body = {"prompt": LONG_IDS, "ignore_eos": True, "stream": stream}
    assert_context_exceeded(post(live, "/v1/completions", {**body, "max_tokens": 7}), 250, 7)
    with openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens"):
            client.completions.create(model=MODEL, prompt=LONG_IDS, max_tokens=100, stream=stream)
    # A prompt that fills the context alone is refused with or without max_tokens.
    for extra in ({"max_tokens": 1}, {}):
        full = post(live, "/v1/completions", {**body, "prompt": LONG_IDS + [11] * 6, **extra})
        assert full.status_code == 400 and "the model's context is 256 tokens" in full.json()["error"]["message"]
    live.assert_serving()


def test_completion_that_fills_the_context_exactly_is_served(live):
    exact = post(live, "/v1/completions", {"prompt": LONG_IDS, "max_tokens": 6, "ignore_eos": True})
    assert exact.status_code == 200, exact.text
    assert exact.json()["usage"] == {"prompt_tokens": 250, "completion_tokens": 6, "total_tokens": 256}
    # Without max_tokens nothing is refused: the job ends where the context fills.
    unset = post(live, "/v1/completions", {"prompt": LONG_IDS, "ignore_eos": True})
    assert unset.status_code == 200, unset.text
    assert unset.json()["usage"]["completion_tokens"] == 6
    assert unset.json()["choices"][0]["finish_reason"] == "length"


def test_chat_over_the_context_is_400_and_exactly_the_context_is_served(live):
    probe = post(live, "/v1/chat/completions", {"messages": LONG_CHAT, "max_tokens": 1})
    assert probe.status_code == 200, probe.text
    num_prompt = probe.json()["usage"]["prompt_tokens"]
    room = CONTEXT - num_prompt
    assert 1 <= room <= 16  # the rendered chat fills most of the context
    for field in ("max_tokens", "max_completion_tokens"):
        over = post(live, "/v1/chat/completions", {"messages": LONG_CHAT, field: room + 1})
        assert_context_exceeded(over, num_prompt, room + 1)
    streamed = post(live, "/v1/chat/completions", {"messages": LONG_CHAT, "max_tokens": 64, "stream": True})
    assert_context_exceeded(streamed, num_prompt, 64)
    exact = post(live, "/v1/chat/completions", {"messages": LONG_CHAT, "max_tokens": room, "ignore_eos": True})
    assert exact.status_code == 200, exact.text
    assert exact.json()["usage"]["completion_tokens"] == room
    live.assert_serving()


def test_grpc_requests_over_the_context_still_end_where_it_fills(live):
    # The SDK's default is unchanged: no refusal, the job runs until the context is full.
    with Client(live.address) as client:
        done = client.complete(LONG_IDS, max_tokens=50, ignore_eos=True)
    assert (len(done.token_ids), done.finish_reason) == (6, "length")


@pytest.mark.parametrize("path, body, where", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": "ok", "model": "tiny\udfff"}, "model"),
    ("/v1/completions", {"prompt": "ok", "stop": ["x", "\ud800"]}, "stop[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udc00 hi"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text"),
])
def test_lone_surrogates_are_400_and_log_no_traceback(live, caplog, path, body, where):
    with caplog.at_level(logging.DEBUG):
        reply = post(live, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == where and "lone UTF-16 surrogate" in error["message"]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert len([r for r in caplog.records if r.levelno >= logging.INFO and "refused" in r.getMessage()]) <= 1
    live.assert_serving()


def scrape(live) -> dict[str, object]:
    """The door's /metrics, parsed: family name -> family (each name once)."""
    text = httpx.get(f"{live.base_url}/metrics", timeout=10).text
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    return {f.name: f for f in families}


def value(families, sample_name: str, **labels) -> float:
    family = families[sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    found = [s.value for s in family.samples if s.name == sample_name and all(s.labels.get(k) == v
                                                                           for k, v in labels.items())]
    assert len(found) == 1, (sample_name, labels, family.samples[:5])
    return found[0]


VLLM_FAMILIES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:request_time_per_output_token_seconds",
                 "vllm:request_queue_time_seconds", "vllm:num_preemptions", "vllm:prompt_tokens",
                 "vllm:generation_tokens", "vllm:request_success", "vllm:request_prompt_tokens",
                 "vllm:request_generation_tokens"]


def test_metrics_carry_vllm_families_with_the_model_name(live):
    live.wait_idle()
    before = scrape(live)
    reply = post(live, "/v1/completions", {"prompt": "the sea at night", "max_tokens": 6, "ignore_eos": True})
    prompt_tokens = reply.json()["usage"]["prompt_tokens"]
    live.wait_idle()
    after = scrape(live)
    for name in VLLM_FAMILIES:
        assert all(s.labels.get("model_name") == MODEL for s in after[name].samples), name
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:generation_tokens_total") == 6 and delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 5
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:request_generation_tokens_sum") == 6
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:kv_cache_usage_perc") == 0
    assert delta("alise_prediction_abs_error_tokens_count") == 1
    # The door's own families stay unlabelled by model.
    assert all("model_name" not in s.labels for s in after["alise_http_requests"].samples)


PHASES = ["vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
          "vllm:request_inference_time_seconds", "vllm:request_time_per_output_token_seconds"]


def test_metrics_carry_vllm_0_26_request_phases_steps_and_prefix_cache(live):
    live.wait_idle()
    before = scrape(live)
    prompt = "the sea at night is dark and the waves are loud, " * 4
    replies = [post(live, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "ignore_eos": True})
               for _ in range(3)]
    prompt_tokens = replies[0].json()["usage"]["prompt_tokens"]
    live.wait_idle()
    after = scrape(live)
    names = [*PHASES, "vllm:iteration_tokens_total", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
             "vllm:num_requests_waiting_by_reason", "vllm:prompt_tokens_cached", "vllm:prompt_tokens_by_source"]
    for name in names:
        assert after[name].samples and all(s.labels.get("model_name") == MODEL for s in after[name].samples), name
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    for name in PHASES:
        assert delta(f"{name}_count") == 3, name
    phase = {name: delta(f"{name}_sum") for name in PHASES}
    assert phase["vllm:request_prefill_time_seconds"] > 0 and phase["vllm:request_decode_time_seconds"] > 0
    # One clock: arrival -> first scheduled -> first token -> last token.
    assert phase["vllm:request_inference_time_seconds"] == pytest.approx(
        phase["vllm:request_prefill_time_seconds"] + phase["vllm:request_decode_time_seconds"])
    assert delta("vllm:e2e_request_latency_seconds_sum") == pytest.approx(
        phase["vllm:request_queue_time_seconds"] + phase["vllm:request_inference_time_seconds"])
    assert phase["vllm:request_time_per_output_token_seconds"] == pytest.approx(
        phase["vllm:request_decode_time_seconds"] / 4)  # 4 tokens after the first, each request
    # The repeats read the prompt's full blocks from the worker's prefix cache.
    hits = delta("vllm:prefix_cache_hits_total")
    assert delta("vllm:prefix_cache_queries_total") == 3 * prompt_tokens
    assert 0 < hits < 2 * prompt_tokens and delta("vllm:prompt_tokens_cached_total") == hits
    assert delta("vllm:prompt_tokens_by_source_total", source="local_cache_hit") == hits
    assert delta("vllm:prompt_tokens_by_source_total", source="local_compute") == 3 * prompt_tokens - hits
    assert delta("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == 0
    # Every step fed the uncached prompt tokens and then one token per decode (4 a request).
    assert delta("vllm:iteration_tokens_total_sum") == 3 * prompt_tokens - hits + 3 * 4
    assert delta("vllm:iteration_tokens_total_count") >= 3 * 5
    assert value(after, "vllm:num_requests_waiting_by_reason", reason="capacity") == \
        value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:num_requests_waiting_by_reason", reason="deferred") == 0


def test_a_request_ended_by_a_stop_string_is_counted_finished(live):
    text = Client(live.address).complete("once upon a time", max_tokens=20, temperature=0, ignore_eos=True).text
    stop = text[len(text) // 2:len(text) // 2 + 4]
    live.wait_idle()
    before = scrape(live)
    reply = post(live, "/v1/completions", {"prompt": "once upon a time", "max_tokens": 20, "temperature": 0,
                                           "ignore_eos": True, "stop": [stop]})
    assert reply.json()["choices"][0]["finish_reason"] == "stop"
    live.wait_idle()
    after = scrape(live)
    assert value(after, "vllm:request_success_total", finished_reason="stop") == \
        value(before, "vllm:request_success_total", finished_reason="stop") + 1
    assert value(after, "alise_requests_total", outcome="finished") == \
        value(before, "alise_requests_total", outcome="finished") + 1
    assert value(after, "vllm:e2e_request_latency_seconds_count") == \
        value(before, "vllm:e2e_request_latency_seconds_count") + 1
