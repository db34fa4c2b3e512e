"""Settings of the HTTP door (read from flags and env in the entrypoint only).

Each field is a flag of `alise http` (``alise.http.main``), its ``#:`` comment the flag's help.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from alise.client._convert import is_carriable_token
from alise.common.grpc_server import split_host_port

#: vLLM's default port, so tools written for it find the door.
DEFAULT_ADDRESS = "127.0.0.1:8000"


@dataclass(frozen=True)
class HttpConfig:
    #: The scheduler's gRPC address.
    scheduler_address: str = "127.0.0.1:50051"
    #: HTTP listen address, HOST:PORT (port 0 = any free port; vLLM's port by default).
    address: str = DEFAULT_ADDRESS
    #: The model name clients send and /v1/models lists (None: the scheduler's model).
    served_model_name: str | None = None
    #: Model directory (or preset) whose tokenizer's chat template renders chat messages (None:
    #: the scheduler's model when it is a directory on this host, else the plain template).
    model: str | None = None
    #: Also serve grpc.health.v1 here, SERVING while the door serves and the scheduler does
    #: ("" = none).
    health_address: str = ""
    #: Deadline of one generation in seconds, passed to the scheduler (504 past it).
    request_timeout_s: float = 600.0
    #: Largest request body accepted (413 beyond): the scheduler's 16 MiB message limit.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Open connections at most, the outer backstop (the scheduler's queue limit, as 429, comes
    #: first): past it the longest idle is closed, and with none idle the new one is answered 503.
    max_connections: int = 8192
    #: Connections one client (remote IP) may hold with no request in progress; past it, its
    #: connection idle longest (and idle 1 s at least) is closed. Requests in progress are
    #: never counted, so a client may run as many as it likes.
    max_idle_connections_per_client: int = 64
    #: A connection whose request line and headers are not all in within this long of its first
    #: byte (or of opening) is answered 408 and closed.
    header_timeout_s: float = 10.0
    #: A request body not all in within this long of its headers is answered 408.
    body_timeout_s: float = 30.0
    #: Largest request line plus headers (431 beyond).
    max_header_bytes: int = 64 * 1024
    #: A kept-alive connection with no new request for this long is closed (uvicorn's).
    keep_alive_timeout_s: float = 5.0
    #: How long a request waits for a scheduler that cannot be reached (one restarting), never
    #: past its own deadline, before it is answered 503 with Retry-After.
    scheduler_wait_s: float = 5.0
    #: How long a request waits for a scheduler that is reachable but accepts nothing (hung),
    #: before it is answered 503 with Retry-After.
    accept_timeout_s: float = 1.5
    #: Seconds between polls of the scheduler's health.
    health_interval_s: float = 0.5
    #: Seconds one poll of the scheduler's health may take.
    health_timeout_s: float = 2.0
    #: Polls in a row that must fail (no answer in time) before /health says 503; an answer of
    #: NOT_SERVING (a draining scheduler) counts at once.
    health_failures: int = 3
    #: Seconds in-flight requests get to finish on SIGTERM.
    drain_grace_s: float = 10.0
    #: Bearer token for the door's own calls (the model lookup) when the scheduler requires one;
    #: clients' requests always carry their own.
    scheduler_token: str | None = None
    #: CA of a TLS scheduler (PEM; None: plaintext).
    scheduler_tls_ca: str | None = None
    #: Certificate (PEM) for HTTPS on the door's listener (None: plain HTTP).
    tls_cert: str | None = None
    #: Private key (PEM) of tls_cert.
    tls_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("address", "scheduler_address") + (("health_address",) if self.health_address else ()):
            try:
                split_host_port(getattr(self, name))
            except ValueError:
                raise ValueError(f"{name} must look like HOST:PORT, got {getattr(self, name)!r}") from None
        for name in ("request_timeout_s", "health_interval_s", "health_timeout_s", "drain_grace_s",
                     "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "scheduler_wait_s",
                     "accept_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_body_bytes", "max_connections", "max_idle_connections_per_client",
                     "max_header_bytes", "health_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must not be blank")
        if self.scheduler_token and not is_carriable_token(self.scheduler_token):
            raise ValueError("scheduler_token holds a character no gRPC header can carry (a control or non-ASCII "
                             "character): a token is printable ASCII")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        for path in (self.tls_cert, self.tls_key, self.scheduler_tls_ca):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"TLS file {path!r} does not exist")
        from alise.modelinfo.source import check_model

        check_model(self.model)  # named on purpose: its template, not the plain one instead
