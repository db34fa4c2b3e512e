"""The door's state (its scheduler client, the served model, health, metrics) and its routes.

Everything a route answers comes from the scheduler's public gRPC API: the model from
``GetStatus`` (with the caller's bearer token, so the scheduler's token check decides who may
list it), health from ``grpc.health.v1``, metrics from ``GetMetrics``, generations from
``Generate``.

No error a client can cause logs a traceback: an exception no handler expected is answered
500 and logged in one line (its traceback at DEBUG), at most 20 at once and 2 a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from alise.client import AliseError, AsyncClient
from alise.common.logs import LogLimiter
from alise.http.chat import ChatRenderer
from alise.http.config import HttpConfig
from alise.http.endpoints import CompletionEndpoint, bearer_token
from alise.http.errors import UNAVAILABLE_RETRY_AFTER_S, ApiError, from_alise_error, unavailable
from alise.http.metrics import HttpMetrics, merged_exposition
from alise.scheduler.request_checks import max_text_chars

logger = logging.getLogger(__name__)

#: How often a call to a scheduler that cannot be reached is tried again, within the bound.
_RETRY_S = 0.25
#: How often the start-up model lookup is tried again while the scheduler does not answer.
_WARM_RETRY_S = 1.0
#: How gRPC says that nothing listens at an address (lower-cased); a frozen server's
#: connection times out instead.
_NOT_LISTENING = ("connection refused", "dns resolution", "name resolution", "no such file")
#: JSON bytes one character of text can take at most: a character outside the BMP written as
#: two ``\uXXXX`` escapes.
MAX_JSON_BYTES_PER_CHAR = 12
#: Room in a body for everything but its text (the other fields, token-id prompts, whitespace).
BODY_ALLOWANCE_BYTES = 1 << 20


@dataclass(frozen=True)
class ServedModel:
    name: str            # what clients send as "model"
    root: str            # the scheduler's model (a preset name or a directory)
    max_model_len: int
    renderer: ChatRenderer


class SchedulerHealth:
    """Polls the scheduler's grpc.health.v1. ``status`` is what /health reports: its last
    answer, or why none came once ``max_failures`` checks in a row went unanswered (one slow
    check under load is no outage)."""

    def __init__(self, client: AsyncClient, interval_s: float, timeout_s: float | None = None,
                 max_failures: int = 1, on_change: Callable[[bool], None] | None = None) -> None:
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s or interval_s
        self.max_failures = max_failures
        self.on_change = on_change
        self.status = "UNKNOWN"
        #: The last check found nothing listening (connection refused: a restart, or down),
        #: as opposed to a scheduler that listens but does not answer (hung, frozen).
        self.is_unreachable = False
        self.num_failures = 0

    @property
    def is_serving(self) -> bool:
        return self.status == "SERVING"

    async def poll_once(self) -> None:
        try:
            status = await self.client.health(timeout_s=self.timeout_s)
            self.is_unreachable, self.num_failures = False, 0
        except AliseError as exc:
            details = exc.details.lower()
            self.is_unreachable = exc.code == grpc.StatusCode.UNAVAILABLE and any(
                phrase in details for phrase in _NOT_LISTENING)
            self.num_failures += 1
            status = f"unreachable ({exc.code.name})"
            if self.num_failures < self.max_failures and self.status != "UNKNOWN":
                return
        if status != self.status:
            logger.info("scheduler %s: %s", self.client.address, status)
            was = self.is_serving
            self.status = status
            if self.on_change is not None and was != self.is_serving:
                self.on_change(self.is_serving)

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval_s)


class Door:
    def __init__(self, config: HttpConfig, client: AsyncClient) -> None:
        self.config = config
        self.client = client
        self.metrics = HttpMetrics()
        self.health = SchedulerHealth(client, config.health_interval_s, config.health_timeout_s,
                                      config.health_failures)
        self.started_s = time.time()
        self._served: ServedModel | None = None
        self._lock = asyncio.Lock()
        #: Model lookups under way, by the token they are made with.
        self._lookups: dict[str | None, asyncio.Future] = {}
        self.warming: asyncio.Task | None = None
        #: Requests being relayed now.
        self.num_in_flight = 0
        #: Set when the door stops: new requests are refused, streams still open end (503).
        self.draining = False
        self.closing = asyncio.Event()
        self.refusals = LogLimiter(logger)
        self._errors = LogLimiter(logger)

    def max_body_bytes(self) -> int:
        """The largest body a request can be: as much text as the model's context admits
        (``max_text_chars``, in its widest JSON spelling) plus ``BODY_ALLOWANCE_BYTES``, never
        past ``max_body_bytes``. Before the model is known, the configured limit. A body over
        it is refused by its Content-Length, or as soon as its bytes read pass it."""
        if self._served is None:
            return self.config.max_body_bytes
        text_bytes = max_text_chars(self._served.max_model_len) * MAX_JSON_BYTES_PER_CHAR
        return min(self.config.max_body_bytes, text_bytes + BODY_ALLOWANCE_BYTES)

    def body_limit_reason(self) -> str:
        """Why ``max_body_bytes`` is what it is, for the 413's message."""
        if self._served is None or self.max_body_bytes() == self.config.max_body_bytes:
            return ""
        max_model_len = self._served.max_model_len
        return (f" (the model's context of {max_model_len} tokens holds at most "
                f"{max_text_chars(max_model_len)} characters of text, {MAX_JSON_BYTES_PER_CHAR} JSON "
                f"bytes each at most, plus {BODY_ALLOWANCE_BYTES} bytes for the other fields)")

    def wait_bound_s(self) -> float:
        """How long a request may wait for the scheduler to accept it: the restart bound while
        the scheduler cannot be reached (never past the request's deadline), else the bound
        for one that is reachable but silent."""
        if self.health.is_unreachable:
            return min(self.config.scheduler_wait_s, self.config.request_timeout_s)
        return self.config.accept_timeout_s

    async def check_caller(self, token: str | None) -> None:
        """Raises the scheduler's refusal (UNAUTHENTICATED) unless ``token`` may call it."""
        await self.client.status(token=token, timeout_s=self.config.accept_timeout_s)

    def api_error(self, exc: AliseError) -> ApiError:
        return from_alise_error(exc, self.client.address)

    def log_error(self, what: str, exc: BaseException) -> None:
        """One line (rate-limited) for an exception no handler expected; its traceback at DEBUG."""
        self._errors.log(logging.ERROR, "%s: %s: %s", what, type(exc).__name__, exc)
        logger.debug("%s", what, exc_info=exc)

    async def served_model(self, token: str | None) -> ServedModel:
        """The model, looked up once (with the door's token, else the caller's). Callers with
        the same token share the lookup under way (one GetStatus for a burst, not one each) and
        resume in the order they asked (a shared future's waiters are woken first in, first
        out), so a burst that comes before the model is known keeps its order. A lookup that
        began before its caller may give up (503) before the caller's own wait bound has
        passed: the caller then waits for another within what is left of its bound (503 past
        it), never longer than its bound in all."""
        token = self.config.scheduler_token or token
        started, left = time.monotonic(), None
        while self._served is None:
            try:
                async with asyncio.timeout(left):
                    # Shielded: a caller that leaves does not end the lookup the others wait for.
                    await asyncio.shield(self._lookup(token))
            except TimeoutError:
                raise unavailable(f"the scheduler did not answer within {self.wait_bound_s():g} s (it may be "
                                  "restarting or overloaded); retry shortly") from None
            except ApiError as error:
                left = started + self.wait_bound_s() - time.monotonic()
                if error.status != 503 or left <= 0:
                    raise
        return self._served

    def _lookup(self, token: str | None) -> asyncio.Future:
        """The lookup under way with ``token``, or a new one."""
        lookup = self._lookups.get(token)
        if lookup is None:
            lookup = self._lookups[token] = asyncio.ensure_future(self._learn_with(token))

            def forget(task: asyncio.Future) -> None:
                self._lookups.pop(token, None)
                if not task.cancelled():
                    task.exception()  # retrieved: every caller may have left before it ended
            lookup.add_done_callback(forget)
        return lookup

    async def _learn_with(self, token: str | None) -> None:
        await self._learn(await self.status(token))

    async def status(self, token: str | None):
        """The scheduler's GetStatus, waited for as a generation waits to be accepted (a
        scheduler that cannot be reached is tried again within the bound); past the bound,
        ApiError 503 with Retry-After."""
        started = time.monotonic()
        while True:
            left = started + self.wait_bound_s() - time.monotonic()
            try:
                return await self.client.status(token=token, timeout_s=max(left, 0.1))
            except AliseError as exc:
                retryable = exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retryable:
                    raise
                if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() - started >= self.wait_bound_s():
                    raise unavailable(f"the scheduler did not answer within {self.wait_bound_s():g} s (it may be "
                                      "restarting or overloaded); retry shortly") from None
            await asyncio.sleep(min(_RETRY_S, max(left, 0.0)))

    async def warm_up(self) -> None:
        """Looks the model up (and loads its tokenizer's chat template, seconds on a cold
        start) before the first request needs it: every request waits for that lookup, so a
        door started before its scheduler keeps trying (every ``_WARM_RETRY_S``) until the
        scheduler answers; only a refusal (the scheduler wants a token: the first caller's
        will do) leaves it to the first request."""
        said = False
        while self._served is None:
            try:
                await self.served_model(None)
            except ApiError as exc:
                if exc.status != 503:
                    logger.info("model lookup deferred to the first request: %s", exc)
                    return
                if not said:
                    logger.info("model lookup: %s; trying again every %g s", exc, _WARM_RETRY_S)
                    said = True
                await asyncio.sleep(_WARM_RETRY_S)
            except AliseError as exc:
                logger.info("model lookup deferred to the first request: %s", exc)
                return

    async def _learn(self, status) -> None:
        async with self._lock:
            if self._served is None:
                self._served = await self._describe(status.model, status.max_model_len)

    async def _describe(self, root: str, max_model_len: int) -> ServedModel:
        renderer = await asyncio.to_thread(ChatRenderer.for_model, self.config.model or root)
        name = self.config.served_model_name or root
        logger.info("serving model %s (scheduler's %s, context %d, %s chat template)", name, root,
                    max_model_len, renderer.template_name)
        return ServedModel(name, root, max_model_len, renderer)

    async def models(self, request: Request) -> Response:
        try:
            # The caller's credential decides, as it does for a generation.
            await self._learn(await self.status(bearer_token(request)))
        except AliseError as exc:
            return self._answer("models", self.api_error(exc).response())
        except ApiError as error:
            return self._answer("models", error.response())
        served = self._served
        card = {"id": served.name, "object": "model", "created": int(self.started_s), "owned_by": "alise",
                "root": served.root, "max_model_len": served.max_model_len}
        return self._answer("models", JSONResponse({"object": "list", "data": [card]}))

    async def health_route(self, request: Request) -> Response:
        if self.health.is_serving and not self.draining:
            return self._answer("health", JSONResponse({"status": "ok"}))
        if self.draining:
            error = ApiError(503, "the HTTP door is stopping", code="shutting_down",
                             retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
        else:
            error = ApiError(503, f"the scheduler is {self.health.status}", code="scheduler_not_serving",
                             retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
        return self._answer("health", error.response())

    async def metrics_route(self, request: Request) -> Response:
        m = self.metrics
        try:
            text, model = await self.client.metrics(timeout_s=self.config.accept_timeout_s,
                                                    token=self.config.scheduler_token or bearer_token(request))
            m.scheduler_up.set(1)
        except AliseError as exc:
            self.refusals.log(logging.INFO, "metrics without the scheduler's: %s", exc.code.name)
            text, model = "", None
            m.scheduler_up.set(0)
        name = self.config.served_model_name or model or (self._served.name if self._served else None)
        body = merged_exposition(text, generate_latest(m.registry).decode(), name)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def version(self, request: Request) -> Response:
        return self._answer("version", JSONResponse({"version": metadata.version("alise")}))

    def _answer(self, route: str, response: Response) -> Response:
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        return response


async def _http_error(request: Request, exc: HTTPException) -> Response:
    messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    error = ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                     code="not_found" if exc.status_code == 404 else None)
    response = error.response()
    response.headers.update(exc.headers or {})
    return response


class _Answered:
    """The outermost layer: Starlette answers an unexpected exception (500, logged in one line)
    and then re-raises it for the server to log; here it stops, so uvicorn logs no traceback."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:  # answered and logged by the 500 handler
            pass


def build_app(door: Door):
    async def server_error(request: Request, exc: Exception) -> Response:
        door.log_error(f"unhandled error on {request.method} {request.url.path}", exc)
        return ApiError(500, "internal error in the HTTP door", code="internal").response()

    routes = [
        Route("/v1/models", door.models, methods=["GET"]),
        Route("/v1/completions", CompletionEndpoint(door, chat=False), methods=["POST"]),
        Route("/v1/chat/completions", CompletionEndpoint(door, chat=True), methods=["POST"]),
        Route("/health", door.health_route, methods=["GET"]),
        Route("/metrics", door.metrics_route, methods=["GET"]),
        Route("/version", door.version, methods=["GET"]),
    ]
    return _Answered(Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                                  Exception: server_error}))
