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
        interceptors=[*interceptors, DecodeGuardInterceptor()],
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


class _Undecodable:
    """Stands in for a request whose bytes did not parse; the guard turns it into a status."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _guarded_deserializer(deserializer):
    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad input
            return _Undecodable(exc)
    return decode


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Answers unparseable requests (corrupt wire format, invalid UTF-8 in a string field)
    with INVALID_ARGUMENT and a readable message, instead of gRPC's UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method

        async def refuse(item: _Undecodable, context) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request to {method} could not be parsed: {item.error}")

        codec = dict(request_deserializer=_guarded_deserializer(handler.request_deserializer),
                     response_serializer=handler.response_serializer)
        if handler.request_streaming:
            behavior = handler.stream_stream or handler.stream_unary

            async def checked(request_iterator, context):
                async for item in request_iterator:
                    if isinstance(item, _Undecodable):
                        await refuse(item, context)
                    yield item

            if handler.response_streaming:
                async def stream_stream(request_iterator, context):
                    async for response in behavior(checked(request_iterator, context), context):
                        yield response
                return grpc.stream_stream_rpc_method_handler(stream_stream, **codec)

            async def stream_unary(request_iterator, context):
                return await behavior(checked(request_iterator, context), context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)

        if handler.response_streaming:
            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for response in handler.unary_stream(request, context):
                    yield response
            return grpc.unary_stream_rpc_method_handler(unary_stream, **codec)

        async def unary_unary(request, context):
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await handler.unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)
