"""Exceptions raised by the SDK: one per gRPC status a caller may want to handle."""

from __future__ import annotations

import grpc


class AliseError(Exception):
    """A failed call. ``code`` is the gRPC status; ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        #: The server's hint (RESOURCE_EXHAUSTED): wait this long before retrying.
        self.retry_after_s = retry_after_s


class InvalidRequest(AliseError):
    """INVALID_ARGUMENT: fix the request; retrying it unchanged will fail again. Also raised,
    before anything is sent, for a request larger than the SDK sends."""


class Overloaded(AliseError):
    """RESOURCE_EXHAUSTED: the server's queue is full; retry later."""


class Unavailable(AliseError):
    """UNAVAILABLE: the server (or every worker) is unreachable or draining."""


class DeadlineExceeded(AliseError):
    """DEADLINE_EXCEEDED: the call's deadline passed before it finished."""


class Unauthenticated(AliseError):
    """UNAUTHENTICATED: missing or wrong credential."""


class Cancelled(AliseError):
    """CANCELLED: the call was cancelled."""


class WrongService(AliseError):
    """UNIMPLEMENTED: something answers at the address, but it is not an ALISE scheduler."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: WrongService,
}

#: How gRPC's own transport words "nothing listens there" (its messages, lower-cased).
_NO_PEER = ("failed to connect to all addresses", "dns resolution failed", "connection refused",
            "name resolution")


def from_rpc_error(error: grpc.RpcError, address: str | None = None) -> AliseError:
    """The SDK's exception for a failed call; with ``address``, a refused connection says what
    to check instead of gRPC's transport message alone."""
    code = error.code()
    details = error.details() or ""
    lowered = details.lower()
    if address and code == grpc.StatusCode.UNAVAILABLE:
        if "http1.x" in lowered or "failed parsing http/2" in lowered:
            details = (f"{address} answers HTTP/1, not gRPC: it is not an ALISE scheduler "
                       f"(the HTTP door, perhaps?) ({details})")
        elif any(phrase in lowered for phrase in _NO_PEER):
            details = (f"no ALISE scheduler answers at {address}: is `alise up` running, and is "
                       f"that its address? ({details})")
    retry_after_s = None
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms" and str(value).isdigit():
            retry_after_s = int(value) / 1000
    return _BY_CODE.get(code, AliseError)(code, details, retry_after_s)
