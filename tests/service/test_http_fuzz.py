"""Bad and generated bodies: each gets a clear 4xx (or a completion), the door and the cluster
stay healthy and hold no memory afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from http_support import start_live_door
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "n", "stop", "stop_token_ids", "seed", "user", "stream", "stream_options", "ignore_eos",
          "priority", "logprobs", "echo", "return_token_ids", "alise_stats", "best_of", "presence_penalty",
          "oracle_output_tokens", "response_format", "tools", "unknown_field"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
#: Values that make valid requests likely enough to exercise the generation path too.
GOOD = {"prompt": st.sampled_from(["hello", "a b c", [5, 6, 7]]),
        "messages": st.just([{"role": "user", "content": "hey"}]),
        "max_tokens": st.integers(1, 6), "model": st.just("tiny-llama")}
CLEAR = {200, 400, 404, 413}


@pytest.fixture(scope="module")
def live(tiny_llama_dir, tmp_path_factory):
    # Requests that leave max_tokens unset get 4, so valid runs stay short.
    door, stop = start_live_door("tiny-llama", tmp_path_factory.mktemp("fuzz") / "jobs.jsonl",
                                 scheduler_overrides={"default_max_tokens": 4}, max_body_bytes=1 << 20)
    yield door
    stop()


def _check(reply: httpx.Response, streamed: bool) -> None:
    assert reply.status_code in CLEAR, (reply.status_code, reply.text)
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    elif not streamed:
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert reply.text.rstrip().endswith("data: [DONE]")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8),
       good=st.fixed_dictionaries({}, optional=GOOD))
def test_generated_bodies_get_clear_answers(live, path, body, good):
    body = {**body, **good}
    for name in ("max_tokens", "max_completion_tokens"):  # keep valid runs short
        if isinstance(body.get(name), int) and not isinstance(body[name], bool):
            body[name] = min(body[name], 6)
    body.pop("oracle_output_tokens", None)
    # json.dumps writes NaN and Infinity, which the door must refuse as clearly as any other value.
    reply = httpx.post(f"{live.base_url}{path}", content=json.dumps(body), timeout=60)
    _check(reply, streamed=body.get("stream") is True and reply.status_code == 200)


@pytest.mark.parametrize("content, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens must be an integer, got a string"),
    (b'{"prompt": "x", "max_tokens": 1e40}', "max_tokens must be in ["),
    (b'{"prompt": "x", "max_tokens": 99999999999}', "max_tokens must be in"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature must be a number"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature must be finite"),
    (b'{"prompt": "x", "stream": "yes"}', "stream must be a boolean"),
    (b'{"prompt": "x", "seed": -9223372036854775809}', "seed must be in"),
    (b'{"prompt": "x", "stop": [1]}', "stop must be a string or an array of strings"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', "only allowed with stream"),
    (b'{"prompt": ["a", "b"]}', "send one prompt per request"),
    (b'{"prompt": [1, 99999999]}', "outside the vocabulary"),
    (b'{"prompt": "   "}', "prompt is empty"),
    (b'{}', "prompt is required"),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs must be in [0, 20], got 21"),
])
def test_bad_completion_bodies_are_400_with_a_message(live, content, fragment):
    reply = httpx.post(f"{live.base_url}/v1/completions", content=content, timeout=30,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], reply.text


@pytest.mark.parametrize("messages, fragment", [
    ("hi", "messages must be a non-empty array"),
    ([], "messages must be a non-empty array"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role must be one of"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
])
def test_bad_chat_messages_are_400(live, messages, fragment):
    reply = httpx.post(f"{live.base_url}/v1/chat/completions", json={"messages": messages}, timeout=30)
    assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], reply.text


def test_oversized_body_routes_and_methods(live):
    big = httpx.post(f"{live.base_url}/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                     timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    chunked = httpx.post(f"{live.base_url}/v1/completions", timeout=30,
                         content=iter([b'{"prompt": "', b"a" * (2 << 20), b'"}']))
    assert chunked.status_code == 413
    assert httpx.get(f"{live.base_url}/v2/nothing").status_code == 404
    wrong = httpx.get(f"{live.base_url}/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["message"]


def test_serving_after_the_fuzz(live):
    live.assert_serving()
