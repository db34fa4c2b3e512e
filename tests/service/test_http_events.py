"""One SSE event per streamed token piece, text or not: clients (vLLM's benchmark, guidellm)
time inter-token latency between events, so a token that adds no text yet must not be folded
into the next event. A model whose vocabulary is wider than its tokenizer's makes many such
tokens: ids past the tokenizer's entries decode to nothing."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from cluster_fixtures import cluster
from http_support import start_live_door

from alise.http.config import HttpConfig
from alise.http.server import start_http
from alise.modelinfo.presets import MINILM_VOCAB_SIZE
from tinymodels import make_tiny_model_dir


@pytest.fixture(scope="module")
def wide_door(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wide-vocab")
    model = make_tiny_model_dir(tmp / "model", "llama", vocab_size=2 * MINILM_VOCAB_SIZE)
    door, stop = start_live_door(str(model), tmp / "jobs.jsonl")
    yield door
    stop()


def stream_events(door, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{door.base_url}/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


def test_every_token_is_an_event_even_when_it_adds_no_text(wide_door):
    events = stream_events(wide_door, {"prompt": "the sea", "max_tokens": 24, "ignore_eos": True, "stream": True,
                                       "temperature": 1.0, "seed": 3,
                                       "stream_options": {"include_usage": True}})
    usage = events[-1]["usage"]
    token_events = [e["choices"][0] for e in events if e["choices"]]
    assert usage["completion_tokens"] == 24
    silent = [c for c in token_events if c["text"] == "" and c["finish_reason"] is None]
    assert silent, "no event for a token without text"
    # A piece may carry several tokens when the stream fell behind; never more events than tokens.
    assert len(silent) < len(token_events) <= 24


async def next_event(lines) -> dict:
    async for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])
    raise AssertionError("the stream ended without an event")


async def test_a_chat_stream_says_nothing_until_its_first_token(tiny_llama_dir):
    """The role event comes with the first token, not at acceptance, as vLLM sends it: vLLM's
    chat benchmark takes the first event for the first token. Here the job waits for a worker,
    so the stream is open (200, headers) and silent until one joins."""
    model, sizes = str(tiny_llama_dir), {"max_model_len": 256, "block_size": 8}
    async with cluster(model, num_workers=0, max_model_len=256) as c:
        http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=c.address))
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "ignore_eos": True,
                "stream": True}
        try:
            async with httpx.AsyncClient(base_url=http.base_url, timeout=60) as h, \
                    h.stream("POST", "/v1/chat/completions", json=body) as reply:
                assert reply.status_code == 200
                lines = reply.aiter_lines()
                first = asyncio.ensure_future(next_event(lines))
                await asyncio.sleep(1.0)
                assert not first.done(), f"an event while queued: {first.result()}"
                await c.add_worker(model, **sizes)
                role, token = await asyncio.wait_for(first, 30), await next_event(lines)
        finally:
            await http.stop(1.0)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "role" not in token["choices"][0]["delta"] and token["choices"][0]["finish_reason"] is None
