"""Logprobs end to end (worker, scheduler, SDK, door) on a real local cluster, in the shapes of
vLLM's OpenAI server: completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` and
chat's ``content: [{token, logprob, bytes, top_logprobs}]``, whole and streamed, one entry per
completion token; greedy requests, so the sampled token is the most likely one."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from cluster_fixtures import cluster
from http_support import start_live_door, with_chat_template

from alise.client import Client
from alise.v1 import scheduler_pb2, scheduler_pb2_grpc

CHAT = [{"role": "user", "content": "hi there"}]
PROMPT = "the sea and the sky"
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def live(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logprobs")
    door, stop = start_live_door(str(with_chat_template(tiny_llama_dir, tmp / "model")), tmp / "jobs.jsonl")
    yield door
    stop()


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live.base_url}{path}", content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json"})


def events(reply: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", reply.text[-300:]
    return [json.loads(line) for line in lines[:-1]]


def check_completion(logprobs: dict, num_tokens: int, k: int, whole: bool = True) -> None:
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) \
        == len(logprobs["text_offset"]) == num_tokens
    offset = 0
    for token, logprob, top, at in zip(*(logprobs[key] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                     "text_offset")), strict=True):
        assert isinstance(token, str) and logprob <= 0 and (at == offset or not whole)
        offset += len(token)
        # Greedy: the sampled token is the most likely, so it is one of the k listed (k = 0: alone).
        assert len(top) == max(k, 1) and top[token] == logprob and max(top.values()) == logprob
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_a_completion_carries_each_tokens_logprobs(live):
    reply = post(live, "/v1/completions", {"prompt": PROMPT, **GREEDY, "logprobs": 3})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert reply.json()["usage"]["completion_tokens"] == len(choice["token_ids"]) == 6
    check_completion(choice["logprobs"], 6, 3)


def test_a_streamed_completion_carries_each_chunks_logprobs_and_the_whole_ones(live):
    whole = post(live, "/v1/completions", {"prompt": PROMPT, **GREEDY, "logprobs": 0}).json()["choices"][0]
    reply = post(live, "/v1/completions", {"prompt": PROMPT, **GREEDY, "logprobs": 0, "stream": True})
    chunks = [e["choices"][0] for e in events(reply) if e["choices"]]
    assert all(len(c["logprobs"]["tokens"]) == len(c["token_ids"]) for c in chunks)
    joined = {key: [v for c in chunks for v in c["logprobs"][key]] for key in whole["logprobs"]}
    check_completion(joined, 6, 0, whole=False)
    # vLLM's streamed offsets: a chunk's first token is at the length of the text streamed before.
    assert [c["logprobs"]["text_offset"][0] for c in chunks] == [len("".join(c["text"] for c in chunks[:i]))
                                                                 for i in range(len(chunks))]
    assert joined["tokens"] == whole["logprobs"]["tokens"]
    assert joined["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-4)


def check_chat(content: list[dict], num_tokens: int, k: int) -> None:
    assert len(content) == num_tokens
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == k and all(set(t) == {"token", "logprob", "bytes"} for t in top)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        if k:
            assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])


def test_a_chat_carries_each_tokens_logprobs(live):
    reply = post(live, "/v1/chat/completions", {"messages": CHAT, **GREEDY, "logprobs": True, "top_logprobs": 2})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert reply.json()["usage"]["completion_tokens"] == len(choice["token_ids"]) == 6
    check_chat(choice["logprobs"]["content"], 6, 2)


def test_a_streamed_chat_carries_each_chunks_logprobs(live):
    reply = post(live, "/v1/chat/completions", {"messages": CHAT, **GREEDY, "logprobs": True, "stream": True})
    chunks = [e["choices"][0] for e in events(reply) if e["choices"]]
    assert chunks[0]["delta"].get("role") == "assistant" and chunks[0]["logprobs"] is None
    for chunk in chunks[1:]:
        check_chat(chunk["logprobs"]["content"], len(chunk["token_ids"]), 0)
    assert sum(len(c["logprobs"]["content"]) for c in chunks[1:]) == 6


def test_without_logprobs_a_choice_has_none(live):
    reply = post(live, "/v1/chat/completions", {"messages": CHAT, **GREEDY})
    assert reply.status_code == 200 and reply.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
])
def test_logprobs_out_of_range_are_400_naming_the_field(live, path, extra, param):
    base = {"messages": CHAT} if "chat" in path else {"prompt": PROMPT}
    reply = post(live, path, {**base, "max_tokens": 2, **extra})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param and param in reply.json()["error"]["message"]


def test_the_sdk_returns_each_tokens_logprobs(live):
    with Client(live.address) as client:
        completion = client.complete(PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=4)
    assert len(completion.logprobs) == len(completion.token_ids) == 5
    for token_id, lp in zip(completion.token_ids, completion.logprobs, strict=True):
        assert len(lp.top_ids) == 4 and lp.top_ids[0] == token_id and lp.top_logprobs[0] == lp.logprob <= 0


async def test_logprobs_survive_the_schedulers_front_process(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), streams_process=True) as c, c.client() as client:
        chunks = [chunk async for chunk in client.generate(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True,
                                                           logprobs=1)]
    assert sum(len(chunk.logprobs) for chunk in chunks) == sum(len(chunk.token_ids) for chunk in chunks) == 4
    assert all(lp.top_ids == (t,) for chunk in chunks for t, lp in zip(chunk.token_ids, chunk.logprobs, strict=True))


def test_the_scheduler_refuses_logprobs_out_of_range(live):
    request = scheduler_pb2.GenerateRequest(text=PROMPT)
    request.sampling.logprobs = 21  # past the SDK's own check
    with grpc.insecure_channel(live.address) as channel, pytest.raises(grpc.RpcError) as error:
        list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "sampling: logprobs must be an integer in [0, 20], got 21"
