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
    """INVALID_ARGUMENT: fix the request; retrying it unchanged will fail again."""


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


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.RpcError) -> AliseError:
    code = error.code()
    cls = _BY_CODE.get(code, AliseError)
    retry_after_s = None
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms" and str(value).isdigit():
            retry_after_s = int(value) / 1000
    return cls(code, error.details() or "", retry_after_s)
