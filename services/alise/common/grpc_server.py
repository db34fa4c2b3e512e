"""Shared gRPC server plumbing: health, reflection, graceful shutdown.

Every ALISE service serves the standard ``grpc.health.v1`` protocol from the moment it
listens, and server reflection so ``grpcurl`` can describe it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)

#: Largest message any ALISE server accepts (a 1 MB prompt fits with room to spare).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ServingStatus:
    """The health servicer plus the names of the services it reports on."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.service_names = list(service_names)

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.servicer.set(name, status)


    async def set_one(self, name: str, serving: bool) -> None:
        await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING if serving
                                else health_pb2.HealthCheckResponse.NOT_SERVING)


def create_server(
    *,
    max_concurrent_rpcs: int | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )


async def add_health_and_reflection(
    server: grpc.aio.Server, service_full_names: Iterable[str]
) -> ServingStatus:
    """Registers health (initially SERVING) and reflection for the given services."""
    names = list(service_full_names)
    status = ServingStatus(names)
    health_pb2_grpc.add_HealthServicer_to_server(status.servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    await status.set(True)
    return status


def bind(server: grpc.aio.Server, address: str) -> int:
    """Binds an insecure port and returns the port number (useful with port 0)."""
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


async def run_until_signal(
    on_stop: Callable[[], Awaitable[None]],
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """Waits for SIGINT/SIGTERM, then awaits ``on_stop`` (the service's drain)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("signal received, draining")
    await on_stop()


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must look like HOST:PORT, got {address!r}")
    return host, int(port)
