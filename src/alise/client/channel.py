"""Channel construction, public: the SDK dials with it, and so do the services (the scheduler
to the predictor, a worker to the scheduler), so every connection keeps the same limits.

Every channel pings its server every ``KEEPALIVE_PING_EVERY_MS`` and gives up on the
connection when a ping goes unanswered for ``KEEPALIVE_TIMEOUT_MS``: a frozen server (a
stopped process, a hung host) fails the calls on it with UNAVAILABLE within 1.5 s, which the
SDK resumes once a server answers again. A connection attempt gives up after
``CONNECT_TIMEOUT_MS``, so a call sent while the server is frozen fails then, instead of
waiting for TCP (the kernel accepts the connection, but nobody answers it). ALISE's servers
accept pings this often (``alise.common.grpc_server``); a proxy between them may need to too.
"""

from __future__ import annotations

import grpc

#: Largest message the SDK sends or accepts: the servers' limit too.
MAX_MESSAGE_BYTES = 16 << 20
KEEPALIVE_PING_EVERY_MS = 500
KEEPALIVE_TIMEOUT_MS = 1000
CONNECT_TIMEOUT_MS = 1000

_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Reconnect quickly after a peer restarts (gRPC's default backoff grows to 2 min).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
            # NOTE: gRPC core reads its minimum connect timeout (default 20 s) from this one.
            ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
            ("grpc.keepalive_time_ms", KEEPALIVE_PING_EVERY_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),  # what times the ping out
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def check_address(address: str) -> str:
    """Returns ``address`` if it names a port: HOST:PORT, [IPv6]:PORT, or a gRPC target with a
    scheme (``dns:///HOST:PORT``, ``unix:PATH``). A bare host is refused: gRPC would quietly
    dial port 443, where no ALISE service listens."""
    if address.startswith("unix:") or "://" in address:
        return address
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not host or not port.isdigit() or (":" in host and not bracketed):
        raise ValueError(f"address must be HOST:PORT (e.g. 127.0.0.1:50051, [::1]:50051), "
                         f"got {address!r}")
    return address


def _read(path: str | None) -> bytes | None:
    """The file's bytes; a path that cannot be read is a ValueError that names it (a caller's
    mistake, like a bad address)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS file {path}: {exc.strerror or exc}") from None


def channel_credentials(tls_ca: str | None, tls_cert: str | None = None,
                        tls_key: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: ``tls_ca`` verifies the server; cert + key present a client certificate."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca),
                                        private_key=_read(tls_key),
                                        certificate_chain=_read(tls_cert))


class _WithMetadata:
    """Adds fixed metadata (a credential) to every call of its kind made on a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        merged = tuple(details.metadata or ()) + self.metadata
        return details._replace(metadata=grpc.aio.Metadata(*merged))


# One class per call kind: grpc.aio files each interceptor under the first kind it is an
# instance of, so one object subclassing all four would only ever see unary-unary calls.
class _UnaryUnaryMetadata(_WithMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStreamMetadata(_WithMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnaryMetadata(_WithMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStreamMetadata(_WithMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def metadata_interceptors(metadata: tuple[tuple[str, str], ...]) -> list:
    """Interceptors that put ``metadata`` on every call of a channel, whatever its kind."""
    kinds = (_UnaryUnaryMetadata, _UnaryStreamMetadata, _StreamUnaryMetadata, _StreamStreamMetadata)
    return [kind(metadata) for kind in kinds]


def make_aio_channel(address: str, *, tls: bool = False, tls_ca: str | None = None,
                     tls_cert: str | None = None, tls_key: str | None = None,
                     metadata: tuple[tuple[str, str], ...] = ()) -> grpc.aio.Channel:
    """An asyncio channel; ``metadata`` (e.g. an internal secret) rides on every call."""
    interceptors = metadata_interceptors(metadata) if metadata else None
    if tls or tls_ca or tls_cert:
        return grpc.aio.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key),
                                       options=_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=_OPTIONS, interceptors=interceptors)


def make_channel(address: str, *, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> grpc.Channel:
    if tls or tls_ca or tls_cert:
        return grpc.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key),
                                   options=_OPTIONS)
    return grpc.insecure_channel(address, options=_OPTIONS)
