"""What the scheduler reports about workers that leave and requests that are cancelled, and
that it opens its doors while its predictor is still down."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import grpc
from cluster_fixtures import cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.predictor.config import PredictorConfig
from alise.predictor.encoder import Encoder
from alise.predictor.service import start_predictor_server
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.predictor_link import predictor_functions
from alise.scheduler.service import PREDICTOR_HEALTH_NAME, start_scheduler

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


async def until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout_s:g} s: {what}"
        await asyncio.sleep(0.05)


async def test_a_departed_workers_series_are_removed(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), num_workers=2, metrics_address="127.0.0.1:0") as c, \
            c.client() as client:
        await asyncio.gather(*(client.complete(f"d {i}", max_tokens=6, ignore_eos=True) for i in range(6)))
        before = await asyncio.to_thread(scrape, c.scheduler.metrics_port)
        await c.remove_worker(c.workers[0][0])
        await until(lambda: set(c.scheduler.engine.links) == {"w1"}, "w0 gone")
        after = await asyncio.to_thread(scrape, c.scheduler.metrics_port)
    assert 'worker="w0"' in before and 'worker="w1"' in before
    assert 'worker="w0"' not in after, [line for line in after.splitlines() if 'worker="w0"' in line]
    assert 'alise_step_seconds_count{worker="w1"}' in after


async def test_cancelled_requests_are_not_counted_as_finished(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        async def cancelled(i: int) -> None:
            async for _ in client.generate(f"leave early {i}", max_tokens=200, ignore_eos=True):
                break  # leaving the loop cancels the request on the server
        await asyncio.gather(*(cancelled(i) for i in range(3)))
        await client.complete("finish me", max_tokens=3, ignore_eos=True)
        core = c.scheduler.engine.core
        await until(lambda: core.num_cancelled == 3, "three cancels applied")
        status = await client.status()
    assert status.num_finished == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def health_of(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=5)
    return reply.status


async def test_the_scheduler_listens_at_once_while_its_predictor_is_down(tiny_llama_dir, tmp_path):
    """Nothing listens at the predictor's address: the warm-up call waits there (up to 30 s),
    but clients and workers are let in at once; the predictor counts as down meanwhile, and
    as up as soon as it starts."""
    predictor_address = f"127.0.0.1:{free_port()}"
    predict, observe = predictor_functions(predictor_address)
    scheduler = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", model=str(tiny_llama_dir)),
                                      predict=predict, observe=observe)
    predictor = None
    try:
        assert await health_of(scheduler.port) == SERVING
        assert await health_of(scheduler.worker_port) == SERVING
        assert await health_of(scheduler.port, PREDICTOR_HEALTH_NAME) == NOT_SERVING
        predictor = await start_predictor_server(
            PredictorConfig(address=predictor_address, index_dir=str(tmp_path / "index")),
            encoder=Encoder(num_threads=1))
        for _ in range(300):
            if await health_of(scheduler.port, PREDICTOR_HEALTH_NAME) == SERVING:
                break
            await asyncio.sleep(0.1)
        assert await health_of(scheduler.port, PREDICTOR_HEALTH_NAME) == SERVING
        assert scheduler.servicer.estimator.state == "ok"
    finally:
        try:
            await scheduler.stop(0.1)
        finally:
            if predictor is not None:
                await predictor.stop(0.1)
