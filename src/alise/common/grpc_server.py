"""Shared gRPC server plumbing: health, reflection, limits, graceful shutdown.

Every ALISE service serves the standard ``grpc.health.v1`` protocol (Check, Watch, List)
from the moment it listens, and server reflection (v1 and v1alpha) so ``grpcurl`` and
``buf curl`` can describe it.

Limits, outermost first (a service's admission control sits inside them and answers first):
gRPC core holds at most ``max_pending_calls`` calls that Python has not picked up yet (past
that it cancels them); ``CallLimit`` answers RESOURCE_EXHAUSTED with a retry-after hint past
``max_calls`` calls in progress, health checks exempt, so a flood never makes a service look
dead to its orchestrator. gRPC's own ``maximum_concurrent_rpcs`` is not used: at its limit it
stops picking up calls, health checks included, and leaves the rest to core's cancelling.

Liveness: every server pings each peer (HTTP/2 keepalive, :class:`Keepalive`) and closes a
connection whose ping is not acknowledged in time, which cancels its calls; and it lets its
peers ping it as often as every ``MIN_PEER_PING_INTERVAL_MS`` (the SDK's channels ping every
0.5 s, ``alise.client.channel``), even between calls. Acknowledging a ping is gRPC core's
work, on its own threads: a busy event loop or a long model step in the process does not
delay it, while a stopped or frozen process misses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from alise.common.logs import LogLimiter

logger = logging.getLogger(__name__)

#: Largest message any ALISE server accepts (a 1 MB prompt fits with room to spare).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Trailing metadata key of the retry hint that goes with RESOURCE_EXHAUSTED.
RETRY_AFTER_KEY = "retry-after-ms"
#: Calls gRPC core queues before Python picks them up (its default is 1,000, then it starts
#: cancelling): room for a burst of several thousand while the event loop catches up.
MAX_PENDING_CALLS = 16384
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
#: The shortest interval between a peer's pings that is not a strike (two strikes, and gRPC
#: core closes the connection with GOAWAY "too_many_pings"; its default is five minutes).
MIN_PEER_PING_INTERVAL_MS = 250


@dataclass(frozen=True)
class Keepalive:
    """How a server watches its peers: a ping every ``ping_every_s``; a connection whose ping
    is not acknowledged within ``timeout_s`` is closed and its calls cancelled. A frozen peer
    (SIGSTOP, a hung host) is noticed within ``ping_every_s + timeout_s``."""

    ping_every_s: float
    timeout_s: float

    def __post_init__(self) -> None:
        if not (self.ping_every_s > 0 and self.timeout_s > 0):
            raise ValueError(f"keepalive intervals must be > 0, got {self.ping_every_s} and {self.timeout_s}")

    def options(self) -> list[tuple[str, int]]:
        timeout_ms = int(self.timeout_s * 1000)
        return [("grpc.keepalive_time_ms", int(self.ping_every_s * 1000)),
                ("grpc.keepalive_timeout_ms", timeout_ms),
                # NOTE: gRPC core times a keepalive ping out by this one (default 60 s), not by
                # keepalive_timeout_ms alone.
                ("grpc.http2.ping_timeout_ms", timeout_ms),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0)]


#: Clients and internal callers: a vanished one's calls are cancelled within 20 s.
PEER_KEEPALIVE = Keepalive(ping_every_s=10.0, timeout_s=10.0)
#: Workers, on the scheduler's worker listener: a frozen worker is dropped (and its jobs go
#: back to the queue) within 3 s, however long its steps take.
WORKER_KEEPALIVE = Keepalive(ping_every_s=1.0, timeout_s=2.0)
#: Checks a service runs on a request's raw bytes before they are parsed: (status, message)
#: refuses the call, None lets it through. Keyed by full method name.
Precheck = Callable[[bytes], "tuple[grpc.StatusCode, str] | None"]


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
    max_calls: int = 4096,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    prechecks: Mapping[str, Precheck] | None = None,
    keepalive: Keepalive = PEER_KEEPALIVE,
) -> grpc.aio.Server:
    """A server with the shared options and interceptors: ``interceptors`` (authentication)
    first, then the call limit, then the decode guard (with ``prechecks``); it pings its
    peers by ``keepalive`` and accepts their pings (see the module doc)."""
    return grpc.aio.server(
        interceptors=[*interceptors, CallLimit(max_calls), DecodeGuardInterceptor(prechecks)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_PEER_PING_INTERVAL_MS),
            *keepalive.options(),
        ],
    )


async def add_health_and_reflection(
    server: grpc.aio.Server, service_full_names: Iterable[str], status: ServingStatus | None = None
) -> ServingStatus:
    """Registers health (initially SERVING) and reflection, v1 and v1alpha, for the given
    services. Given ``status``, the server answers health from it (one status, several
    listeners) instead of a new one."""
    names = list(service_full_names)
    if status is None:
        status = ServingStatus(names)
        await status.set(True)
    health_pb2_grpc.add_HealthServicer_to_server(status.servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    _add_reflection(server, [*names, health_name, reflection.SERVICE_NAME, REFLECTION_V1])
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> asyncio.Event:
    """An event that SIGINT/SIGTERM set, their handlers installed now. A service asks for it
    before it starts: a signal that comes while it starts (or between its "listening" line and
    its wait) then asks for the drain, where the default action would kill the process."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_until_signal(on_stop: Callable[[], Awaitable[None]], stop: asyncio.Event | None = None) -> None:
    """Waits for ``stop`` (default: SIGINT/SIGTERM from now on), then awaits ``on_stop`` (the
    service's drain)."""
    if stop is None:
        stop = stop_on_signals()
    await stop.wait()
    logger.info("signal received, draining")
    await on_stop()


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address must look like HOST:PORT, got {address!r}")
    return host, int(port)


class _Refused:
    """Stands in for a request refused before or by parsing; the guard turns it into a status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


def _guarded_deserializer(deserializer, method: str, precheck: Precheck | None):
    def decode(data: bytes):
        if precheck is not None:
            try:
                refusal = precheck(data)
            except WireScanError as exc:
                refusal = grpc.StatusCode.INVALID_ARGUMENT, f"request to {method} could not be parsed: {exc}"
            if refusal is not None:
                return _Refused(*refusal)
        try:
            return deserializer(data)
        except Exception as exc:  # any parse failure is the caller's bad input
            return _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"request to {method} could not be parsed: {exc}")
    return decode


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Answers unparseable requests (corrupt wire format, invalid UTF-8 in a string field)
    with INVALID_ARGUMENT and a readable message, instead of gRPC's UNKNOWN, and runs the
    service's prechecks on raw bytes first (so a request too large to be worth parsing is
    refused without the parse: parsing holds the GIL, in any thread).

    The wrapper keeps the handler's style: gRPC runs an async-generator handler by iterating
    what it yields, and a coroutine handler (health's ``Watch``) that writes its responses
    with ``context.write``; wrapping one style as the other breaks the call.
    """

    def __init__(self, prechecks: Mapping[str, Precheck] | None = None) -> None:
        self.prechecks = dict(prechecks or {})

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method

        async def refuse(item: _Refused, context) -> None:
            await context.abort(item.code, item.message)

        codec = dict(request_deserializer=_guarded_deserializer(
                         handler.request_deserializer, method, self.prechecks.get(method)),
                     response_serializer=handler.response_serializer)
        if handler.request_streaming:
            async def checked(request_iterator, context):
                async for item in request_iterator:
                    if isinstance(item, _Refused):
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
            if isinstance(request, _Refused):
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


class CallLimit(grpc.aio.ServerInterceptor):
    """At most ``max_calls`` calls in progress (health checks exempt); the next is answered
    RESOURCE_EXHAUSTED with a retry-after hint. The outer backstop: a service's admission
    control (the scheduler's queue bound) sits below it and answers first."""

    def __init__(self, max_calls: int, *, retry_after_s: float = 2.0,
                 exempt: tuple[str, ...] = (HEALTH_CHECK_METHOD,)) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls must be >= 1, got {max_calls}")
        self.max_calls = max_calls
        self.retry_after_s = retry_after_s
        self.exempt = exempt
        self.num_active = 0
        self._refusals = LogLimiter(logger)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        return _around(handler, self._slot)

    @contextlib.asynccontextmanager
    async def _slot(self, context):
        if self.num_active >= self.max_calls:
            self._refusals.log(logging.WARNING, "refused a call: %d calls in progress, the limit is %d",
                               self.num_active, self.max_calls)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server busy: {self.num_active} calls in progress, the limit is "
                                f"{self.max_calls}; retry in a few seconds",
                                trailing_metadata=((RETRY_AFTER_KEY, str(int(self.retry_after_s * 1000))),))
        self.num_active += 1
        try:
            yield
        finally:
            self.num_active -= 1


def _around(handler: grpc.RpcMethodHandler, around) -> grpc.RpcMethodHandler:
    """``handler`` with its behavior run inside ``around(context)``, an async context manager,
    in the behavior's own style (see DecodeGuardInterceptor)."""
    kind = f"{'stream' if handler.request_streaming else 'unary'}_{'stream' if handler.response_streaming else 'unary'}"
    behavior = getattr(handler, kind)
    if handler.response_streaming and not inspect.iscoroutinefunction(behavior):
        async def call(request, context):
            async with around(context):
                async for response in behavior(request, context):
                    yield response
    else:
        async def call(request, context):
            async with around(context):
                return await behavior(request, context)
    return getattr(grpc, f"{kind}_rpc_method_handler")(
        call, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class WireScanError(ValueError):
    """The raw bytes are not a protobuf message a service will parse."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise WireScanError("truncated message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireScanError("varint longer than 10 bytes")


def iter_fields(buf: memoryview, max_fields: int):
    """(field number, wire type, start, end) of each field of a message's raw bytes, without
    parsing the values; a message of more than ``max_fields`` fields is refused, so the walk
    costs at most that many steps whatever the bytes."""
    pos = num_fields = 0
    while pos < len(buf):
        num_fields += 1
        if num_fields > max_fields:
            raise WireScanError(f"more than {max_fields} fields")
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        start = pos
        if wire_type == 0:
            _, end = _varint(buf, pos)
        elif wire_type == 2:
            length, start = _varint(buf, pos)
            end = start + length
        elif wire_type in (1, 5):
            end = pos + (8 if wire_type == 1 else 4)
        else:
            raise WireScanError(f"wire type {wire_type} of field {number} is not supported")
        if end > len(buf):
            raise WireScanError("truncated message")
        pos = end
        yield number, wire_type, start, end


def count_varints(buf: memoryview) -> int:
    """How many varints packed bytes hold (each ends in the one byte below 0x80), vectorized."""
    import numpy as np

    return int(np.count_nonzero(np.frombuffer(buf, dtype=np.uint8) < 0x80))
