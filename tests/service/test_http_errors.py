"""The door's answers when the scheduler refuses: 401 (its token check), 429 with Retry-After
(its queue is full), 503 (no worker), 504 (the deadline passed), and /health following the
scheduler's health. A scheduler with no worker is enough to provoke each."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.common.security import SecurityConfig
from alise.http.config import HttpConfig
from alise.http.server import start_http
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler

TOKEN = "tok-3c9a"


async def _door(scheduler_config: SchedulerConfig, **http_overrides):
    scheduler = await start_scheduler(scheduler_config)
    http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=f"127.0.0.1:{scheduler.port}",
                                       health_interval_s=0.05, **http_overrides))
    return scheduler, http


async def test_bearer_token_passes_through_to_the_schedulers_check():
    security = SecurityConfig(api_tokens=(TOKEN,), internal_secret="s3cret-for-workers")
    scheduler, http = await _door(SchedulerConfig(address="127.0.0.1:0", model="tiny-llama", security=security,
                                                  max_wait_no_worker_s=0.3))
    try:
        async with openai.AsyncOpenAI(base_url=f"{http.base_url}/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError, match="missing or invalid credential"):
                await bad.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
        async with httpx.AsyncClient(base_url=http.base_url) as h:
            anonymous = await h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
        async with openai.AsyncOpenAI(base_url=f"{http.base_url}/v1", api_key=TOKEN, max_retries=0) as good:
            assert [m.id async for m in good.models.list()] == ["tiny-llama"]
            # Past the token check, the request waits for a worker that never comes: 503.
            with pytest.raises(openai.InternalServerError, match="no worker connected") as info:
                await good.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
            assert info.value.status_code == 503 and info.value.body["code"] == "UNAVAILABLE"
            # A stream is opened (200) when the scheduler accepts it; the later 503 is its last event.
            stream = await good.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, stream=True)
            assert stream.response.status_code == 200
            with pytest.raises(openai.APIError, match="no worker connected") as info:
                async for _ in stream:
                    pass
            assert info.value.body["code"] == "UNAVAILABLE"
    finally:
        await http.stop(0.5)
        await scheduler.stop(0.1)


async def test_full_queue_is_429_with_retry_after_and_deadline_is_504():
    scheduler, http = await _door(SchedulerConfig(address="127.0.0.1:0", model="tiny-llama", max_queued=1,
                                                  max_wait_no_worker_s=30), request_timeout_s=4.0)
    try:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=30) as h:
            waiting = asyncio.create_task(h.post("/v1/completions", json={"prompt": "first", "max_tokens": 2}))
            while scheduler.streams.num_live() == 0:
                await asyncio.sleep(0.01)
            busy = await h.post("/v1/completions", json={"prompt": "second", "max_tokens": 2, "stream": True})
            assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
            assert "server busy" in busy.json()["error"]["message"]
            assert busy.json()["error"]["type"] == "rate_limit_error"
            late = await waiting
            assert late.status_code == 504 and late.json()["error"]["code"] == "DEADLINE_EXCEEDED"
        # The expired job leaves the queue once the scheduler sees its stream go; until then it
        # would pass for the next blocker and let the request meant to be refused take its place.
        while scheduler.streams.num_live() != 0:
            await asyncio.sleep(0.01)
        async with openai.AsyncOpenAI(base_url=f"{http.base_url}/v1", api_key="x", max_retries=0) as client:
            blocker = asyncio.create_task(client.completions.create(model="tiny-llama", prompt="a", max_tokens=2))
            while scheduler.streams.num_live() == 0:
                await asyncio.sleep(0.01)
            with pytest.raises(openai.RateLimitError):
                await client.completions.create(model="tiny-llama", prompt="b", max_tokens=2)
            with pytest.raises(openai.APIStatusError) as info:
                await blocker
            assert info.value.status_code == 504
    finally:
        await http.stop(0.5)
        await scheduler.stop(0.1)


async def _grpc_health(port: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_health_follows_the_scheduler():
    scheduler, http = await _door(SchedulerConfig(address="127.0.0.1:0", model="tiny-llama"),
                                  health_address="127.0.0.1:0")
    async with httpx.AsyncClient(base_url=http.base_url) as h:
        assert (await h.get("/health")).status_code == 200
        assert await _grpc_health(http.health_port) == "SERVING"
        await scheduler.health.set(False)  # what a draining scheduler reports
        for _ in range(200):
            reply = await h.get("/health")
            if reply.status_code == 503:
                break
            await asyncio.sleep(0.02)
        assert reply.status_code == 503 and "NOT_SERVING" in reply.json()["error"]["message"]
        assert await _grpc_health(http.health_port) == "NOT_SERVING"
        await scheduler.stop(0.1)
        for _ in range(200):
            reply = await h.get("/health")
            if "unreachable" in reply.text:
                break
            await asyncio.sleep(0.05)
        assert reply.status_code == 503 and "unreachable" in reply.json()["error"]["message"]
        # A generation against the gone scheduler is a 503, not a hang.
        gone = await h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert gone.status_code == 503
    await http.stop(0.5)


async def test_a_stream_is_opened_when_the_scheduler_accepts_it_and_not_before():
    """No worker: nothing can produce a token, yet the accepted stream has its status line."""
    from alise.client import AsyncClient, Client, DeadlineExceeded, InvalidRequest

    scheduler, http = await _door(SchedulerConfig(address="127.0.0.1:0", model="tiny-llama",
                                                  max_wait_no_worker_s=30))
    try:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=10) as h:
            body = {"prompt": "queued", "max_tokens": 2, "stream": True}
            async with h.stream("POST", "/v1/completions", json=body) as reply:
                assert reply.status_code == 200
                assert reply.headers["content-type"].startswith("text/event-stream")
                assert scheduler.streams.num_live() == 1  # queued, no token yet
            refused = await h.post("/v1/completions", json={**body, "top_p": 5.0})
            assert refused.status_code == 400  # refused before acceptance: its own status
        for _ in range(300):  # the closed stream cancelled its job
            if scheduler.streams.num_live() == 0:
                break
            await asyncio.sleep(0.01)
        assert scheduler.streams.num_live() == 0

        address = f"127.0.0.1:{scheduler.port}"
        accepted = []

        async def note() -> None:
            accepted.append(scheduler.streams.num_live())

        async with AsyncClient(address) as client:
            stream = client.generate("queued", max_tokens=2, on_accepted=note, timeout_s=0.5)
            with pytest.raises(DeadlineExceeded):  # no worker: the job waits out its deadline
                async for _ in stream:
                    pass
            assert accepted == [1]
            with pytest.raises(InvalidRequest):
                async for _ in client.generate("bad", top_p=5.0, on_accepted=note):
                    pass
            assert accepted == [1]

        def sync_call() -> list[int]:
            calls = []
            with Client(address) as client:
                with pytest.raises(InvalidRequest):
                    for _ in client.generate("bad", top_p=5.0, on_accepted=lambda: calls.append("bad")):
                        pass
                with pytest.raises(DeadlineExceeded):
                    for _ in client.generate("queued", max_tokens=2, timeout_s=0.5,
                                             on_accepted=lambda: calls.append("queued")):
                        pass
            return calls

        assert await asyncio.to_thread(sync_call) == ["queued"]
    finally:
        await http.stop(0.5)
        await scheduler.stop(0.1)


async def test_an_unknown_model_is_answered_after_the_token_check():
    """The door has a token of its own (it knows the model): a caller without one is still
    told 401, not a 404 that names the served model."""
    security = SecurityConfig(api_tokens=(TOKEN,), internal_secret="s3cret-w")
    scheduler, http = await _door(SchedulerConfig(address="127.0.0.1:0", model="tiny-llama", security=security,
                                                  max_wait_no_worker_s=0.3), scheduler_token=TOKEN)
    try:
        async with httpx.AsyncClient(base_url=http.base_url) as h:
            body = {"model": "gpt-4", "prompt": "hi", "max_tokens": 2}
            anonymous = await h.post("/v1/completions", json=body)
            assert anonymous.status_code == 401 and "tiny-llama" not in anonymous.text
            known = await h.post("/v1/completions", json=body, headers={"authorization": f"Bearer {TOKEN}"})
            assert known.status_code == 404 and "tiny-llama" in known.json()["error"]["message"]
    finally:
        await http.stop(0.5)
        await scheduler.stop(0.1)


@pytest.mark.parametrize("token", [b"\xe9t\xe9", b"a\tb"])
async def test_a_token_no_grpc_header_can_carry_is_no_credential(token):
    # It was a 500 (gRPC's "Invalid metadata"): it is no credential, and the scheduler decides.
    headers = [(b"authorization", b"Bearer " + token)]
    security = SecurityConfig(api_tokens=(TOKEN,), internal_secret="s3cret-for-workers")
    for config, expected in [(SchedulerConfig(address="127.0.0.1:0", model="tiny-llama", security=security), 401),
                             (SchedulerConfig(address="127.0.0.1:0", model="tiny-llama"), 200)]:
        scheduler, http = await _door(config)
        try:
            async with httpx.AsyncClient(base_url=http.base_url) as h:
                models = await h.get("/v1/models", headers=headers)
                assert models.status_code == expected, models.text
                if expected == 401:
                    reply = await h.post("/v1/completions", headers=headers, json={"prompt": "hi", "max_tokens": 2})
                    assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        finally:
            await http.stop(0.5)
            await scheduler.stop(0.1)
