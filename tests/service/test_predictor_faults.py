"""The scheduler with a real predictor that goes down and comes back."""

from __future__ import annotations

import asyncio
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.predictor.config import PredictorConfig
from alise.predictor.encoder import Encoder
from alise.predictor.service import start_predictor_server
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.predictor_link import predictor_functions
from alise.scheduler.service import PREDICTOR_HEALTH_NAME, start_scheduler
from alise.worker.config import WorkerConfig
from alise.worker.service import Worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def predictor_health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=PREDICTOR_HEALTH_NAME), timeout=2)
    return reply.status


async def test_predictor_outage_degrades_then_recovers(tiny_llama_dir, tmp_path):
    encoder = Encoder(num_threads=1)
    predictor_address = f"127.0.0.1:{free_port()}"
    pconfig = PredictorConfig(address=predictor_address, index_dir=str(tmp_path / "idx"))
    predictor = await start_predictor_server(pconfig, encoder=encoder)
    predict, observe = predictor_functions(predictor_address)
    scheduler = await start_scheduler(
        SchedulerConfig(address="127.0.0.1:0", model=str(tiny_llama_dir), predictor_timeout_s=2.0),
        predict=predict, observe=observe)
    scheduler.servicer.estimator.retry_after_s = 0.2
    address = f"127.0.0.1:{scheduler.port}"
    worker = Worker(WorkerConfig(scheduler_address=f"127.0.0.1:{scheduler.worker_port}", model=str(tiny_llama_dir),
                                 health_address=""))
    await worker.load()
    task = asyncio.create_task(worker.run())
    from alise.client import AsyncClient
    try:
        async with AsyncClient(address) as client:
            await client.complete("before the outage", max_tokens=3, ignore_eos=True)
            assert (await client.status()).predictor_state == "ok"
            assert await predictor_health(address) == health_pb2.HealthCheckResponse.SERVING

            await predictor.stop(0.1)
            out = await client.complete("during the outage", max_tokens=3, ignore_eos=True)
            assert len(out.token_ids) == 3
            # The request did not wait for the prediction; the failed call marks the state.
            for _ in range(100):
                if (await client.status()).predictor_state.startswith("degraded"):
                    break
                await asyncio.sleep(0.05)
            assert (await client.status()).predictor_state.startswith("degraded")
            await asyncio.sleep(0.05)
            assert await predictor_health(address) == health_pb2.HealthCheckResponse.NOT_SERVING

            predictor = await start_predictor_server(pconfig, encoder=encoder)
            for _ in range(50):  # recovers by itself: no operator action, just traffic
                await client.complete("after the outage", max_tokens=3, ignore_eos=True)
                if (await client.status()).predictor_state == "ok":
                    break
                await asyncio.sleep(0.1)
            assert (await client.status()).predictor_state == "ok"
            await asyncio.sleep(0.05)
            assert await predictor_health(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await worker.stop()
        await task
        worker.close()
        await scheduler.stop(0.1)
        await predictor.stop(0.1)
