"""The HTTP door as `alise up` runs it (real processes: scheduler, worker, door), through the
official openai client and httpx."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from compose_cluster import free_port

from alise.cluster.local import ClusterConfig, LocalCluster, service_commands
from alise.worker.config import WorkerConfig

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("http-up")
    http_port = free_port()
    cfg = ClusterConfig(address=f"127.0.0.1:{free_port()}", model=str(tiny_llama_dir), predictor=False,
                        state_dir=str(tmp), worker_health_base_port=free_port(),
                        http_address=f"127.0.0.1:{http_port}", http_health_address=f"127.0.0.1:{free_port()}",
                        worker=WorkerConfig(block_size=4))
    cluster = LocalCluster(service_commands(cfg), log_dir=str(tmp / "logs"))
    cluster.start()
    try:
        cluster.wait_healthy(240)
        yield cluster, f"http://127.0.0.1:{http_port}"
    finally:
        cluster.stop()


def test_openai_client_streams_a_chat_completion_and_a_completion(up):
    _, base = up
    with openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as client:
        model = client.models.list().data[0].id
        chat = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "tell me about the sea"}], max_tokens=12,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        text = "".join(e.choices[0].delta.content or "" for e in chat if e.choices)
        assert chat[-1].usage.completion_tokens == 12 and text
        done = list(client.completions.create(model=model, prompt="once upon", max_tokens=8, stream=True,
                                              extra_body={"ignore_eos": True, "return_token_ids": True}))
        assert sum(len(e.choices[0].model_extra["token_ids"]) for e in done) == 8
        assert done[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="temperature must be finite and >= 0"):
            client.completions.create(model=model, prompt="x", temperature=-1)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="not-" + model, prompt="x")


def test_twenty_megabyte_body_is_413_and_the_door_serves_on(up):
    _, base = up
    big = httpx.post(f"{base}/v1/completions", content=b'{"prompt": "' + b"a" * 20_000_000 + b'"}', timeout=60)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert httpx.get(f"{base}/health").status_code == 200
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True}, timeout=60)
    assert ok.json()["usage"]["completion_tokens"] == 3


def test_concurrent_async_streams_lose_and_repeat_nothing(up):
    _, base = up

    async def scenario():
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as client:
            async def one(i):
                stream = await client.completions.create(
                    model=(await client.models.list()).data[0].id, prompt=f"stream {i}", max_tokens=20,
                    stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True, "return_token_ids": True})
                events = [e async for e in stream]
                ids = [t for e in events if e.choices for t in e.choices[0].model_extra["token_ids"]]
                return len(ids), events[-1].usage.completion_tokens
            return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(scenario()) == [(20, 20)] * 16


def test_sigterm_stops_the_door_cleanly(up):
    cluster, _ = up
    codes = cluster.stop(grace_s=30)
    assert codes["http"] == 0, codes
