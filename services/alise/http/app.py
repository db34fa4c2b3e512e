"""The door's state (its scheduler client, the served model, health, metrics) and its routes.

Everything a route answers comes from the scheduler's public gRPC API: the model from
``GetStatus`` (with the caller's bearer token, so the scheduler's token check decides who may
list it), health from ``grpc.health.v1``, generations from ``Generate``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from alise.client import AliseError, AsyncClient
from alise.http.chat import ChatRenderer
from alise.http.config import HttpConfig
from alise.http.endpoints import CompletionEndpoint, bearer_token
from alise.http.errors import ApiError, from_alise_error
from alise.http.metrics import HttpMetrics
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    name: str            # what clients send as "model"
    root: str            # the scheduler's model (a preset name or a directory)
    max_model_len: int
    renderer: ChatRenderer


class SchedulerHealth:
    """Polls the scheduler's grpc.health.v1; ``status`` is its last answer (or why none came)."""

    def __init__(self, client: AsyncClient, interval_s: float,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.client = client
        self.interval_s = interval_s
        self.on_change = on_change
        self.status = "UNKNOWN"

    @property
    def is_serving(self) -> bool:
        return self.status == "SERVING"

    async def poll_once(self) -> None:
        try:
            status = await self.client.health(timeout_s=self.interval_s)
        except AliseError as exc:
            status = f"unreachable ({exc.code.name})"
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
        self.health = SchedulerHealth(client, config.health_interval_s)
        self.started_s = time.time()
        self._served: ServedModel | None = None
        self._lock = asyncio.Lock()
        self.warming: asyncio.Task | None = None

    async def served_model(self, token: str | None) -> ServedModel:
        """The model, looked up once (with the door's token, else the caller's)."""
        if self._served is None:
            await self._learn(await self.client.status(token=self.config.scheduler_token or token))
        return self._served

    async def warm_up(self) -> None:
        """Looks the model up (and loads a chat template) before the first request needs it."""
        try:
            await self.served_model(None)
        except AliseError as exc:  # e.g. the scheduler wants a token: the first caller's will do
            logger.info("model lookup deferred to the first request: %s", exc)

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
            await self._learn(await self.client.status(token=bearer_token(request)))
        except AliseError as exc:
            return self._answer("models", from_alise_error(exc).response())
        served = self._served
        card = {"id": served.name, "object": "model", "created": int(self.started_s), "owned_by": "alise",
                "root": served.root, "max_model_len": served.max_model_len}
        return self._answer("models", JSONResponse({"object": "list", "data": [card]}))

    async def health_route(self, request: Request) -> Response:
        if self.health.is_serving:
            return self._answer("health", JSONResponse({"status": "ok"}))
        error = ApiError(503, f"the scheduler at {self.client.address} is {self.health.status}",
                         code="scheduler_not_serving")
        return self._answer("health", error.response())

    async def metrics_route(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

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


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s", request.url.path)
    return ApiError(500, "internal error in the HTTP door", code="internal").response()


def build_app(door: Door) -> Starlette:
    routes = [
        Route("/v1/models", door.models, methods=["GET"]),
        Route("/v1/completions", CompletionEndpoint(door, chat=False), methods=["POST"]),
        Route("/v1/chat/completions", CompletionEndpoint(door, chat=True), methods=["POST"]),
        Route("/health", door.health_route, methods=["GET"]),
        Route("/metrics", door.metrics_route, methods=["GET"]),
        Route("/version", door.version, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})
