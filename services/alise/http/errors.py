"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

A refusal from the scheduler keeps its gRPC message word for word; ``code`` is then the gRPC
status name (``INVALID_ARGUMENT``, ...), so a client can tell the door's own refusals (short
snake_case codes such as ``model_not_found``) from the scheduler's.
"""

from __future__ import annotations

import math

import grpc
from alise.client import AliseError
from starlette.responses import JSONResponse

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


def from_alise_error(exc: AliseError) -> ApiError:
    """The scheduler's refusal as the HTTP answer: same message, matching status."""
    status = HTTP_STATUS.get(exc.code, 500)
    retry_after = exc.retry_after_s
    if status == 429 and retry_after is None:
        retry_after = DEFAULT_RETRY_AFTER_S
    return ApiError(status, exc.details or exc.code.name.lower(), code=exc.code.name,
                    retry_after_s=retry_after if status == 429 else None)
