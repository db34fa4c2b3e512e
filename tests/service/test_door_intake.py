"""A burst leaves the HTTP door's request handling in the order it came: one model lookup
shared by the requests that come before the model is known, one batch of chat renders (a real
scheduler in-process, the door's real client; chat requests parsed from real ASGI requests)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.requests import Request

from alise.client import AsyncClient
from alise.http.app import Door, ServedModel
from alise.http.chat import ChatRenderer
from alise.http.config import HttpConfig
from alise.http.endpoints import CompletionEndpoint
from alise.http.errors import ApiError
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler


@pytest.fixture()
async def door():
    scheduler = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", worker_address="127.0.0.1:0",
                                                      model="tiny-llama"))
    address = f"127.0.0.1:{scheduler.port}"
    client = AsyncClient(address)
    try:
        yield Door(HttpConfig(address="127.0.0.1:0", scheduler_address=address), client)
    finally:
        await client.close()
        await scheduler.stop(0.1)


async def test_a_burst_before_the_model_is_known_makes_one_lookup_and_keeps_its_order(door, monkeypatch):
    calls = []
    real_status = door.client.status

    async def status(**kwargs):
        calls.append(kwargs.get("token"))
        return await real_status(**kwargs)

    monkeypatch.setattr(door.client, "status", status)
    done = []

    async def request(i: int) -> str:
        served = await door.served_model(None)
        done.append(i)
        return served.root

    roots = await asyncio.gather(*(request(i) for i in range(32)))
    assert calls == [None]
    assert done == list(range(32))
    assert set(roots) == {"tiny-llama"}
    # Known now: no more lookups.
    await door.served_model("another-token")
    assert calls == [None]


async def test_a_caller_that_leaves_does_not_end_the_lookup_the_others_wait_for(door):
    first = asyncio.ensure_future(door.served_model(None))
    others = [asyncio.ensure_future(door.served_model(None)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    served = await asyncio.wait_for(asyncio.gather(*others), 30)
    assert {s.root for s in served} == {"tiny-llama"}
    assert first.cancelled()


class SlowRenderer(ChatRenderer):
    """The plain template, each chat taking ``delay_s[content]`` to render (a long template
    run)."""

    def __init__(self, delay_s: dict[str, float]) -> None:
        super().__init__()
        self.delay_s = delay_s

    def render(self, messages, template_kwargs=None):
        time.sleep(self.delay_s.get(messages[-1]["content"], 0.0))
        return super().render(messages, template_kwargs)


def chat_request(content: str) -> Request:
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return Request(scope, receive)


async def test_a_burst_of_chats_is_rendered_in_one_batch_and_leaves_in_the_order_it_came():
    # The earlier a chat came, the longer it takes to render: rendered one by one in a pool of
    # threads, the later ones would be done first.
    contents = [f"question {i}" for i in range(16)]
    renderer = SlowRenderer({c: 0.004 * (16 - i) for i, c in enumerate(contents)})
    door = Door(HttpConfig(address="127.0.0.1:0", scheduler_address="127.0.0.1:1"), AsyncClient("127.0.0.1:1"))
    door._served = ServedModel("m", "m", 256, renderer)
    endpoint = CompletionEndpoint(door, chat=True)
    done = []

    async def one(i: int):
        prepared = await endpoint._prepare(chat_request(contents[i]), None)
        done.append(i)
        return prepared

    try:
        prepared = await asyncio.gather(*(one(i) for i in range(16)))
    finally:
        await door.client.close()
    assert done == list(range(16))
    assert endpoint.renders.num_batches == 1
    assert [p[1] for p in prepared] == [f"User: {c}\nAssistant:" for c in contents]


async def test_a_caller_that_joins_a_lookup_late_is_answered_within_its_own_bound():
    # Accepts connections and never answers: a scheduler that is frozen, as the door sees it.
    frozen = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    address = f"127.0.0.1:{frozen.sockets[0].getsockname()[1]}"
    door = Door(HttpConfig(address="127.0.0.1:0", scheduler_address=address, accept_timeout_s=1.0),
                AsyncClient(address))
    try:
        first = asyncio.ensure_future(door.served_model(None))
        await asyncio.sleep(0.6)  # the first lookup gives up 0.4 s after the late caller comes
        started = time.monotonic()
        with pytest.raises(ApiError) as refused:
            await door.served_model(None)
        waited_s = time.monotonic() - started
        assert refused.value.status == 503
        assert 0.9 <= waited_s <= 1.3  # its own bound of 1 s: another lookup for what was left
        with pytest.raises(ApiError):
            await first
    finally:
        await door.client.close()
        frozen.close()
