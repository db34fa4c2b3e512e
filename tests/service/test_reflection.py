"""Server reflection: what grpcurl uses to list and describe services."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler


async def test_scheduler_lists_and_describes_its_services(tiny_llama_dir):
    server = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", model=str(tiny_llama_dir)))
    try:
        def describe():
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                db = ProtoReflectionDescriptorDatabase(channel)
                services = set(db.get_services())
                symbol = db.FindFileContainingSymbol("alise.v1.SchedulerService")
                return services, symbol.name
        import asyncio
        services, file_name = await asyncio.to_thread(describe)
    finally:
        await server.stop(0.1)
    assert {"alise.v1.SchedulerService", "alise.v1.WorkerService", "grpc.health.v1.Health"} <= services
    assert file_name == "alise/v1/scheduler.proto"
