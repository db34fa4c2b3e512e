"""Shared gRPC server plumbing: health, reflection, graceful shutdown.

Every ALISE service serves the standard ``grpc.health.v1`` protocol (Check, Watch, List)
from the moment it listens, and server reflection (v1 and v1alpha) so ``grpcurl`` and
``buf curl`` can describe it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

logger = logging.getLogger(__name__)

#: Largest message any ALISE server accepts (a 1 MB prompt fits with room to spare).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class HealthServicer(health.aio.HealthServicer):
    """``grpc.health.v1.Health`` with ``List`` (the package's servicer answers it UNIMPLEMENTED)."""

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        # NOTE: _server_status is the package's own table of statuses, the one Check and
        # Watch read (grpcio-health-checking is pinned with grpcio).
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()})


class ServingStatus:
    """The health servicer plus the names of the services it reports on."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self.servicer = HealthServicer()
        self.service_names = list(service_names)

    async def set(self, serving: bool) -> None:
        for name in ["", *self.service_names]:
            await self.set_one(name, serving)

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
    """Registers health (initially SERVING) and reflection, v1 and v1alpha, for the given
    services."""
    names = list(service_full_names)
    status = ServingStatus(names)
    health_pb2_grpc.add_HealthServicer_to_server(status.servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    _add_reflection(server, [*names, health_name, reflection.SERVICE_NAME, REFLECTION_V1])
    await status.set(True)
    return status


#: Server reflection's stable name; grpcurl and buf curl try it before v1alpha.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """One reflection servicer answers both versions: v1 is v1alpha's messages, field for
    field, under another package, so v1alpha's classes parse and write v1's bytes."""
    _register_reflection_v1_file()
    servicer = reflection.aio.ReflectionServicer(service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))


def _register_reflection_v1_file() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default pool (grpcio-reflection ships
    only v1alpha), so reflection can describe its own v1 service."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = name, "grpc.reflection.v1"
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:
                f.type_name = f.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


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
    with INVALID_ARGUMENT and a readable message, instead of gRPC's UNKNOWN.

    The wrapper keeps the handler's style: gRPC runs an async-generator handler by iterating
    what it yields, and a coroutine handler (health's ``Watch``) that writes its responses
    with ``context.write``; wrapping one style as the other breaks the call.
    """

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
            async def checked(request_iterator, context):
                async for item in request_iterator:
                    if isinstance(item, _Undecodable):
                        await refuse(item, context)
                    yield item

            async def check_stream(request_iterator, context):
                return checked(request_iterator, context)
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(
                    _streaming(handler.stream_stream, check_stream), **codec)
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, check_stream), **codec)

        async def check_one(request, context):
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return request
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, check_one), **codec)
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, check_one), **codec)


def _unary(behavior, check):
    async def call(request, context):
        return await behavior(await check(request, context), context)
    return call


def _streaming(behavior, check):
    """A response-streaming wrapper of the same style as ``behavior``."""
    if inspect.iscoroutinefunction(behavior):
        async def write_style(request, context) -> None:
            await behavior(await check(request, context), context)
        return write_style

    async def yield_style(request, context):
        async for response in behavior(await check(request, context), context):
            yield response
    return yield_style
