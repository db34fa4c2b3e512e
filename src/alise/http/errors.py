"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

A refusal from the scheduler keeps its gRPC message word for word; ``code`` is then the gRPC
status name (``INVALID_ARGUMENT``, ...), so a client can tell the door's own refusals (short
snake_case codes such as ``model_not_found``) from the scheduler's. What the transport says
when the scheduler cannot be reached names internal addresses: clients are told that the
scheduler is unavailable, with Retry-After, and the details go to the log.
"""

from __future__ import annotations

import math

import grpc
from starlette.responses import JSONResponse

from alise.client import AliseError

#: gRPC status -> HTTP status. Anything else is a 500.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

#: HTTP status -> the error ``type`` clients switch on (OpenAI's names where it has one).
ERROR_TYPE = {
    400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
    409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
    401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
    501: "server_error", 503: "service_unavailable", 504: "timeout",
}

#: Retry-After for RESOURCE_EXHAUSTED when the scheduler gave no hint.
DEFAULT_RETRY_AFTER_S = 1.0
#: Retry-After for UNAVAILABLE: a scheduler restarting, no worker yet, a door draining.
UNAVAILABLE_RETRY_AFTER_S = 2.0
#: How gRPC's transport words a peer it cannot reach or lost (lower-cased).
_TRANSPORT = ("failed to connect", "connection refused", "connection reset", "socket closed",
              "dns resolution", "name resolution", "keepalive", "goaway", "no alise scheduler answers",
              "http1.x", "failed parsing http/2")


class ApiError(Exception):
    """A refused request: its HTTP status and the OpenAI-style body that explains it."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return ERROR_TYPE.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str, code: str = "scheduler_unavailable") -> ApiError:
    return ApiError(503, message, code=code, retry_after_s=UNAVAILABLE_RETRY_AFTER_S)


def from_alise_error(exc: AliseError, scheduler_address: str = "") -> ApiError:
    """The scheduler's refusal as the HTTP answer: same message, matching status. A message
    from the transport (the scheduler unreachable) is replaced; no message names
    ``scheduler_address``."""
    status = HTTP_STATUS.get(exc.code, 500)
    message = exc.details or exc.code.name.lower()
    if status == 503 and any(phrase in message.lower() for phrase in _TRANSPORT):
        return unavailable("the scheduler cannot be reached (it may be restarting); retry shortly")
    if scheduler_address:
        message = message.replace(scheduler_address, "the scheduler")
    retry_after = exc.retry_after_s
    if status == 429 and retry_after is None:
        retry_after = DEFAULT_RETRY_AFTER_S
    elif status == 503:
        retry_after = retry_after or UNAVAILABLE_RETRY_AFTER_S
    return ApiError(status, message, code=exc.code.name, retry_after_s=retry_after if status in (429, 503) else None)
