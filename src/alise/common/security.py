"""Access control: bearer tokens on the client API, a shared secret on internal channels, TLS.

* Client API (``alise.v1.SchedulerService``, the scheduler's client listener): when tokens
  are configured, each call must carry ``authorization: Bearer <token>`` with one of them.
* Internal APIs (``alise.v1.WorkerService`` on the scheduler's worker listener,
  ``alise.v1.PredictorService``): when a shared secret is configured, each call must carry
  ``x-alise-secret: <secret>``; with ``tls_client_ca`` the internal listeners also require a
  client certificate (mutual TLS, checked by the transport before any handler runs).
* Health and reflection stay open, so orchestrators can probe.

Refusals are UNAUTHENTICATED with a fixed message; credentials are compared in constant
time and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass

import grpc

from alise.common.logs import LogLimiter

logger = logging.getLogger(__name__)

CLIENT_PREFIXES = ("/alise.v1.SchedulerService/",)
INTERNAL_PREFIXES = ("/alise.v1.WorkerService/", "/alise.v1.PredictorService/")
SECRET_HEADER = "x-alise-secret"


@dataclass(frozen=True)
class SecurityConfig:
    #: Bearer tokens accepted on the client API (empty: the API is open).
    api_tokens: tuple[str, ...] = ()
    #: Shared secret for worker and predictor channels (None: open).
    internal_secret: str | None = None
    #: Server certificate and key (PEM); both set = TLS on the listeners.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: CA that client certificates must chain to (set = mutual TLS required on internal
    #: listeners: the scheduler's worker listener, the predictor's).
    tls_client_ca: str | None = None
    #: CA used by this service's own outgoing channels to verify their peers (PEM).
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if any(not t or any(c.isspace() for c in t) for t in self.api_tokens):
            raise ValueError("api tokens must be non-empty and contain no whitespace")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_ca):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"TLS file {path!r} does not exist")

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def has_internal_credential(self) -> bool:
        """Whether internal callers (workers) must prove who they are: a secret or mTLS."""
        return bool(self.internal_secret) or self.tls_client_ca is not None

    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SECRET_HEADER, self.internal_secret),) if self.internal_secret else ()


def security_from_env_and_files(token_file: str | None = None, secret_file: str | None = None,
                                **tls) -> SecurityConfig:
    """Tokens from ``token_file`` (one per line) or ALISE_API_TOKENS (comma-separated); the
    internal secret from ``secret_file`` or ALISE_INTERNAL_SECRET."""
    tokens: list[str] = []
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            tokens = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    elif os.environ.get("ALISE_API_TOKENS"):
        tokens = [t.strip() for t in os.environ["ALISE_API_TOKENS"].split(",") if t.strip()]
    secret = os.environ.get("ALISE_INTERNAL_SECRET") or None
    if secret_file:
        with open(secret_file, encoding="utf-8") as f:
            secret = f.read().strip() or None
    return SecurityConfig(api_tokens=tuple(tokens), internal_secret=secret, **tls)


def _matches(candidate: str, accepted: tuple[str, ...]) -> bool:
    ok = False
    for token in accepted:  # no early exit: the time does not depend on which token matched
        ok |= hmac.compare_digest(candidate.encode(), token.encode())
    return ok


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT binds only the loopback interface (127.0.0.0/8, ::1, localhost)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        return False


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, config: SecurityConfig) -> None:
        self.config = config
        self._refusals = LogLimiter(logger)

    def _allowed(self, method: str, metadata) -> bool:
        headers = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
        if method.startswith(CLIENT_PREFIXES) and self.config.api_tokens:
            value = headers.get("authorization", "")
            scheme, _, token = value.partition(" ")
            return scheme.lower() == "bearer" and _matches(token.strip(), self.config.api_tokens)
        if method.startswith(INTERNAL_PREFIXES) and self.config.internal_secret:
            return _matches(headers.get(SECRET_HEADER, ""), (self.config.internal_secret,))
        return True

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._allowed(handler_call_details.method,
                                            handler_call_details.invocation_metadata):
            return handler
        self._refusals.log(logging.WARNING, "refused a call to %s: missing or invalid credential",
                           handler_call_details.method)
        return _deny(handler)


_DENIED = "missing or invalid credential"


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def abort(request_or_iterator, context):
        if handler.request_streaming:  # its first message first: a write racing the refusal hides it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(request_or_iterator.__anext__(), timeout=5.0)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    codec = dict(request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **codec)
    return grpc.unary_unary_rpc_method_handler(abort, **codec)


def bind_port(server: grpc.aio.Server, address: str, config: SecurityConfig | None, *,
              internal: bool = True) -> int:
    """Binds ``address`` with TLS when the config has a certificate (and, on an ``internal``
    listener, client certificates required when it has a client CA); returns the port."""
    if config is None or not config.uses_tls:
        port = server.add_insecure_port(address)
    else:
        with open(config.tls_key, "rb") as f:
            key = f.read()
        with open(config.tls_cert, "rb") as f:
            cert = f.read()
        client_ca = None
        if config.tls_client_ca and internal:
            with open(config.tls_client_ca, "rb") as f:
                client_ca = f.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                            require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, creds)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


def add_security_arguments(p, *, server: bool = True, client_api: bool = True) -> None:
    """Flags shared by the service entrypoints (``client_api=False``: a server with no client
    API, such as the predictor, takes no API tokens)."""
    g = p.add_argument_group("security")
    if server:
        if client_api:
            g.add_argument("--api-token-file", help="bearer tokens accepted on the client API, one per "
                           "line (or env ALISE_API_TOKENS, comma-separated); default: none, an open API")
        g.add_argument("--tls-cert", help="server certificate (PEM): TLS on the listeners "
                       "(default: none, plaintext)")
        g.add_argument("--tls-key", help="server private key (PEM) (default: none)")
        g.add_argument("--tls-client-ca", help="require client certificates signed by this CA on "
                       "internal listeners (the scheduler's worker listener, the predictor), mTLS "
                       "(default: none)")
    else:
        g.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS (default: none)")
        g.add_argument("--tls-key", help="client private key (PEM) (default: none)")
    g.add_argument("--internal-secret-file", help="shared secret of internal channels "
                   "(or env ALISE_INTERNAL_SECRET; default: none, open internal channels)")
    g.add_argument("--tls-ca", help="CA that verifies the services this one dials (PEM) "
                   "(default: none, plaintext)")


def security_from_args(args) -> SecurityConfig:
    return security_from_env_and_files(
        getattr(args, "api_token_file", None), args.internal_secret_file,
        tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None),
        tls_client_ca=getattr(args, "tls_client_ca", None), tls_ca=args.tls_ca)
