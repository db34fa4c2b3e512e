"""The HTTP door in process, in front of a real scheduler and worker, through the official
``openai`` client (sync and async) and plain httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from http_support import CHAT_TEMPLATE, start_live_door, with_chat_template

from alise.client import Client
from alise.http.chat import ChatRenderer, render_plain


@pytest.fixture(scope="module")
def live(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    model = with_chat_template(tiny_llama_dir, tmp / "model")
    door, stop = start_live_door(str(model), tmp / "jobs.jsonl", served_model_name="tiny-chat")
    yield door
    stop()


@pytest.fixture()
def oai(live):
    with openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def greedy(live, prompt, n: int):
    with Client(live.address) as client:
        return client.complete(prompt, max_tokens=n, temperature=0, ignore_eos=True)


def test_models_lists_the_served_model(live, oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    raw = httpx.get(f"{live.base_url}/v1/models").json()["data"][0]
    assert raw["max_model_len"] == 256 and raw["root"].endswith("model")


def test_completion_whole_and_streamed_with_the_openai_client(live, oai):
    whole = oai.completions.create(model="tiny-chat", prompt="the sea", max_tokens=7,
                                   extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 7 and whole.usage.prompt_tokens >= 2
    events = list(oai.completions.create(model="tiny-chat", prompt="the sea", max_tokens=9, stream=True,
                                         stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True, "return_token_ids": True}))
    content, usage = events[:-1], events[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 9
    assert sum(len(e.choices[0].model_extra["token_ids"]) for e in content) == 9
    assert content[-1].choices[0].finish_reason == "length"
    assert all(e.choices[0].finish_reason is None for e in content[:-1])


def test_chat_streamed_renders_the_tokenizer_template(live, oai):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    events = list(oai.chat.completions.create(model="tiny-chat", messages=messages, max_completion_tokens=6,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert events[0].choices[0].delta.role == "assistant"
    assert events[-1].usage.completion_tokens == 6
    # The prompt the scheduler counted is the template's rendering, without added special tokens.
    tokenizer = live.cluster.scheduler.servicer.info.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert events[-1].usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    whole = oai.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens <= 4


def test_async_client_streams_concurrently(live):
    async def scenario():
        async with openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0) as client:
            async def one(i):
                stream = await client.completions.create(
                    model="tiny-chat", prompt=f"story {i}", max_tokens=8, stream=True,
                    extra_body={"ignore_eos": True, "return_token_ids": True})
                return [t async for e in stream for t in e.choices[0].model_extra["token_ids"]]
            return await asyncio.gather(*(one(i) for i in range(6)))

    assert [len(ids) for ids in asyncio.run(scenario())] == [8] * 6


def test_http_gives_the_same_tokens_and_text_as_grpc(live):
    ref = greedy(live, "the cat sat on", 12)
    body = {"prompt": "the cat sat on", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=60).json()
    assert whole["choices"][0]["token_ids"] == ref.token_ids and whole["choices"][0]["text"] == ref.text
    ids, text = [], ""
    with httpx.stream("POST", f"{live.base_url}/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                ids += choice["token_ids"]
                text += choice["text"]
    assert ids == ref.token_ids and text == ref.text


def _streamed_text(live, body) -> tuple[list[str], str]:
    deltas, finish = [], None
    with httpx.stream("POST", f"{live.base_url}/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return deltas, finish


def test_stop_strings_end_the_text_before_them_and_never_leak(live):
    ref = greedy(live, "once upon a time", 40)
    stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 5]  # spans token boundaries in the middle
    expected = ref.text[:ref.text.index(stop)]
    body = {"prompt": "once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stop": ["zzzz-never", stop]}
    deltas, finish = _streamed_text(live, body)
    assert "".join(deltas) == expected and finish == "stop"
    whole = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=60).json()
    assert whole["choices"][0]["text"] == expected and whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] < 40
    live.wait_idle()  # the rest of the generation was cancelled


def test_stop_token_ids_end_generation_on_that_token(live):
    ref = greedy(live, "the river", 10)
    stop_id = ref.token_ids[3]
    out = httpx.post(f"{live.base_url}/v1/completions", timeout=60, json={
        "prompt": "the river", "max_tokens": 10, "temperature": 0, "ignore_eos": True,
        "stop_token_ids": [stop_id], "return_token_ids": True}).json()
    ids = out["choices"][0]["token_ids"]
    assert ids == ref.token_ids[:ref.token_ids.index(stop_id) + 1] and out["choices"][0]["finish_reason"] == "stop"


def test_alise_stats_only_when_asked(live, oai):
    plain = httpx.post(f"{live.base_url}/v1/completions", json={"prompt": "x y", "max_tokens": 2}, timeout=60).json()
    assert "alise" not in plain
    stats = oai.completions.create(model="tiny-chat", prompt="x y", max_tokens=2,
                                   extra_body={"alise_stats": True}).model_extra["alise"]
    assert stats["estimate"]["source"] and stats["estimate"]["mean"] > 0
    assert stats["num_preemptions"] == 0 and 0 <= stats["queued_s"] <= stats["e2e_s"]
    assert 0 < stats["ttft_s"] <= stats["e2e_s"]
    events = list(oai.completions.create(model="tiny-chat", prompt="x y", max_tokens=2, stream=True,
                                         extra_body={"alise_stats": True, "ignore_eos": True}))
    assert "alise" in events[-1].model_extra and all("alise" not in e.model_extra for e in events[:-1])


def _disconnects(live) -> float:
    for line in httpx.get(f"{live.base_url}/metrics").text.splitlines():
        if line.startswith("alise_http_client_disconnects_total "):
            return float(line.split()[1])
    raise AssertionError("no disconnect counter")


def test_client_disconnect_cancels_the_request_and_frees_its_blocks(live):
    finished, disconnects = len(live.jobs()), _disconnects(live)
    body = {"prompt": "a very long answer", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 3:
                break
    # Leaving the `with` closed the connection mid-stream.
    live.wait_idle()
    assert _disconnects(live) == disconnects + 1
    assert len(live.jobs()) == finished  # the job log lists finished jobs: this one was aborted


def test_disconnect_while_waiting_for_a_whole_completion_cancels_it(live):
    finished, disconnects = len(live.jobs()), _disconnects(live)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.base_url}/v1/completions", timeout=httpx.Timeout(60, read=0.3),
                   json={"prompt": "long and whole", "max_tokens": 200, "ignore_eos": True})
    live.wait_idle()
    assert _disconnects(live) == disconnects + 1 and len(live.jobs()) == finished


def test_errors_are_the_openai_exceptions_with_the_schedulers_messages(live, oai):
    with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive integer"):
        oai.completions.create(model="tiny-chat", prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        oai.completions.create(model="tiny-chat", prompt="hi", top_p=1.5, stream=True)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        oai.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="priority must be 0"):
        oai.completions.create(model="tiny-chat", prompt="hi", extra_body={"priority": 3})
    with pytest.raises(openai.BadRequestError, match="the model's context is 256 tokens"):
        oai.completions.create(model="tiny-chat", prompt="word " * 400)
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        oai.completions.create(model="gpt-4", prompt="hi")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    live.assert_serving()


def test_plain_template_for_tokenizers_without_one():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    assert render_plain(messages) == "System: s\nUser: u\nAssistant: a\nUser: v\nAssistant:"
    renderer = ChatRenderer.for_model("tiny-llama")
    assert renderer.template_name == "plain" and renderer.render(messages) == render_plain(messages)


def test_health_metrics_version(live):
    assert httpx.get(f"{live.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live.base_url}/version").json()["version"]
    metrics = httpx.get(f"{live.base_url}/metrics").text
    assert 'alise_http_requests_total{route="completions",status="200"}' in metrics
    assert "alise_http_client_disconnects_total" in metrics


def test_listening_socket_sends_events_without_nagle_delay():
    import socket

    from alise.http.server import bind_socket

    # asyncio sets TCP_NODELAY on accepted connections only when the socket's proto says TCP;
    # without it a stream's first event waited for the client's delayed ACK (40 ms).
    sock = bind_socket("127.0.0.1:0")
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_text_prompts_are_bounded_in_characters_before_they_are_tokenized(live, monkeypatch):
    from alise.client import InvalidRequest
    from alise.scheduler.request_checks import MAX_CHARS_PER_TOKEN

    checks = live.cluster.scheduler.servicer.checks
    encoded = []
    real_encode = checks._encode_batch
    monkeypatch.setattr(checks, "_encode_batch", lambda texts: encoded.extend(map(len, texts)) or real_encode(texts))
    limit = 256 * MAX_CHARS_PER_TOKEN  # the live door's context is 256 tokens
    with Client(live.address) as client:
        for num_chars in (limit + 1, 1_000_000):  # parsed, and refused from its raw bytes
            with pytest.raises(InvalidRequest, match=f"holds at most {limit} characters of text"):
                client.complete("a" * num_chars, max_tokens=2)
        # Within the bound it is tokenized, and refused by its token count.
        with pytest.raises(InvalidRequest, match="the model's context is 256 tokens"):
            client.complete("word " * (limit // 5), max_tokens=2)
    assert encoded == [limit // 5 * 5]
    chat = httpx.post(f"{live.base_url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "b" * (limit + 1)}]})
    assert chat.status_code == 400 and f"messages have {limit + 1} characters" in chat.json()["error"]["message"]
    text = httpx.post(f"{live.base_url}/v1/completions", timeout=60, json={"prompt": "c" * 4 * limit})
    assert text.status_code == 400 and text.json()["error"]["param"] == "prompt"
    assert f"prompt has {4 * limit} characters; the model's context of 256 tokens" in text.json()["error"]["message"]
    # A body larger than any text the context admits is refused from its length, unparsed.
    huge = httpx.post(f"{live.base_url}/v1/completions", timeout=60, json={"prompt": "c" * 3_900_000})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    assert f"holds at most {limit} characters of text" in huge.json()["error"]["message"]
    assert encoded == [limit // 5 * 5]  # the door refused it: the scheduler never saw it
    live.assert_serving()
