"""Server reflection: what grpcurl uses to list and describe services."""

from __future__ import annotations

import asyncio

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler


def describe(port: int, symbol: str) -> tuple[set[str], str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        return set(db.get_services()), db.FindFileContainingSymbol(symbol).name


async def test_each_scheduler_listener_lists_and_describes_its_own_services(tiny_llama_dir):
    server = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", model=str(tiny_llama_dir)))
    try:
        clients = await asyncio.to_thread(describe, server.port, "alise.v1.SchedulerService")
        workers = await asyncio.to_thread(describe, server.worker_port, "alise.v1.WorkerService")
    finally:
        await server.stop(0.1)
    assert {"alise.v1.SchedulerService", "grpc.health.v1.Health"} <= clients[0]
    assert "alise.v1.WorkerService" not in clients[0]
    assert clients[1] == "alise/v1/scheduler.proto"
    assert {"alise.v1.WorkerService", "grpc.health.v1.Health"} <= workers[0]
    assert "alise.v1.SchedulerService" not in workers[0]
    assert workers[1] == "alise/v1/worker.proto"
