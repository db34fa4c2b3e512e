"""``POST /v1/completions`` and ``POST /v1/chat/completions``, as raw ASGI endpoints.

Raw ASGI rather than a framework response class, because the door needs two things most
response helpers hide:

* the status line waits for the scheduler's verdict, so a refused request (400, 401, 429,
  503) gets its status and JSON body even when it asked to stream. A stream's status line and
  headers go out the moment the scheduler accepts it (its ``alise-accepted`` metadata), while
  the job is queued, so the first token is one write; an error after that (the deadline, no
  worker in time) travels as an error event, as vLLM's do. A whole completion's status waits
  for its end;
* the connection is watched from the moment the body is read: a client that goes away,
  while queued, streaming or waiting for a whole completion, cancels its gRPC call at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from alise.client import AliseError
from alise.common.logs import request_id_var
from alise.http.errors import ApiError, from_alise_error
from alise.http.generation import Piece, pieces
from alise.http.protocol import GenerationRequest, parse_request
from alise.http.shapes import SSE_DONE, Facts, Shaper, sse
from starlette.requests import Request

logger = logging.getLogger(__name__)

#: HTTP status recorded for a client that closed the connection first (nginx's convention).
CLIENT_CLOSED = 499


async def read_json(request: Request, max_bytes: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body has {int(declared)} bytes; the limit is {max_bytes}",
                       code="body_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise ApiError(413, f"the request body exceeds the limit of {max_bytes} bytes", code="body_too_large")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


async def send_json(send, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def until_disconnect(receive) -> None:
    """Returns when the client has gone (or the response is complete: the server says so too)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Relay:
    """Sends one request's answer: an error, a whole completion, or a stream of events."""

    def __init__(self, door, req: GenerationRequest, prompt, shaper: Shaper, facts: Facts,
                 token: str | None, arrival_s: float) -> None:
        self.door, self.req, self.prompt, self.shaper, self.facts = door, req, prompt, shaper, facts
        self.token, self.arrival_s = token, arrival_s
        self.status = 0
        self.finish_reason = ""
        #: Set just before the last send, so a wake-up of the disconnect watcher caused by the
        #: response completing is not taken for a client that left.
        self.done = False

    async def run(self, send) -> None:
        opened = (lambda: self._open(send)) if self.req.stream else None
        stream = pieces(self.door.client, self.req, self.prompt, self.facts, token=self.token,
                        timeout_s=self.door.config.request_timeout_s, on_accepted=opened)
        try:
            first = await anext(stream)
        except AliseError as exc:
            if self.status:  # the stream is open: the error is its last event
                await self._end_with_error(exc, send)
            else:
                await self.refuse(send, from_alise_error(exc))
            return
        self.door.metrics.ttft.observe(time.monotonic() - self.arrival_s)
        if self.req.stream:
            await self._stream(first, stream, send)
        else:
            await self._whole(first, stream, send)

    async def refuse(self, send, error: ApiError) -> None:
        self.status, self.done = error.status, True
        await send_json(send, error.status, error.body(), error.headers())

    async def _whole(self, piece: Piece, stream, send) -> None:
        texts, ids = [piece.text], list(piece.token_ids)
        try:
            while piece.finish_reason is None:
                piece = await anext(stream)
                texts.append(piece.text)
                ids.extend(piece.token_ids)
        except AliseError as exc:
            await self.refuse(send, from_alise_error(exc))
            return
        self.status, self.finish_reason, self.done = 200, piece.finish_reason, True
        await send_json(send, 200, self.shaper.whole("".join(texts), ids, piece.finish_reason, self.facts),
                        {"x-request-id": self.facts.request_id})

    async def _event(self, send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _open(self, send) -> None:
        """The stream's status line and headers (and a chat's role event), once accepted."""
        self.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-request-id", self.facts.request_id.encode())]})
        if self.shaper.chat:
            await self._event(send, sse(self.shaper.role_chunk()))

    async def _end_with_error(self, exc: AliseError, send) -> None:
        # The status line is sent already: the error travels as an event, as vLLM's does.
        error = from_alise_error(exc)
        self.finish_reason = f"error {error.status}"
        await self._event(send, sse(error.body()))
        self.done = True
        await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})

    async def _stream(self, piece: Piece, stream, send) -> None:
        if not self.status:  # the scheduler's metadata did not come first (it always does)
            await self._open(send)
        shaper, include_usage = self.shaper, self.req.include_usage
        try:
            while True:
                if piece.text or piece.finish_reason or self.req.return_token_ids:
                    await self._event(send, sse(shaper.chunk(piece.text, piece.token_ids, piece.finish_reason,
                                                             self.facts, include_usage)))
                if piece.finish_reason is not None:
                    break
                piece = await anext(stream)
            self.finish_reason = piece.finish_reason
            if include_usage:
                await self._event(send, sse(shaper.usage_chunk(self.facts)))
        except AliseError as exc:
            await self._end_with_error(exc, send)
            return
        self.done = True
        await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})


class CompletionEndpoint:
    def __init__(self, door, *, chat: bool) -> None:
        self.door = door
        self.chat = chat
        self.route = "chat" if chat else "completions"

    async def __call__(self, scope, receive, send) -> None:
        arrival_s = time.monotonic()
        request = Request(scope, receive)
        request_id = uuid.uuid4().hex
        request_id_var.set(request_id)
        token = bearer_token(request)
        try:
            req, prompt, model_name = await self._prepare(request, token)
        except (ApiError, AliseError) as exc:
            error = exc if isinstance(exc, ApiError) else from_alise_error(exc)
            logger.info("refused: %d %s", error.status, error.message)
            self.door.metrics.requests.labels(self.route, str(error.status)).inc()
            await send_json(send, error.status, error.body(), error.headers())
            return
        facts = Facts(request_id)
        shaper = Shaper(chat=self.chat, request_id=request_id, model=model_name,
                        return_token_ids=req.return_token_ids, alise_stats=req.alise_stats)
        relay = Relay(self.door, req, prompt, shaper, facts, token, arrival_s)
        await self._race(relay, send, receive)
        self.door.metrics.requests.labels(self.route, str(relay.status)).inc()
        logger.info("%s %d: %d prompt + %d completion tokens, finish %s, %.3f s%s", self.route,
                    relay.status, facts.prompt_tokens, facts.completion_tokens, relay.finish_reason or "-",
                    time.monotonic() - arrival_s, f", user {req.user!r}" if req.user else "")

    async def _prepare(self, request: Request, token: str | None):
        body = await read_json(request, self.door.config.max_body_bytes)
        req = parse_request(body, chat=self.chat)
        served = await self.door.served_model(token)
        if req.model is not None and req.model != served.name:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves "
                           f"`{served.name}`.", param="model", code="model_not_found")
        if not self.chat:
            return req, req.prompt, served.name
        renderer = served.renderer
        if renderer.tokenizer is None:
            return req, renderer.render(req.messages), served.name
        return req, await asyncio.to_thread(renderer.render, req.messages), served.name

    async def _race(self, relay: Relay, send, receive) -> None:
        """Runs the relay until it ends or the client leaves; leaving cancels the gRPC call."""
        metrics = self.door.metrics
        metrics.in_flight.inc()
        work = asyncio.ensure_future(relay.run(send))
        watcher = asyncio.ensure_future(until_disconnect(receive))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work.done() or relay.done:
                await work
                return
            work.cancel()
            metrics.disconnects.inc()
            relay.status = CLIENT_CLOSED
            logger.info("client closed the connection: request cancelled")
            await asyncio.gather(work, return_exceptions=True)
        finally:
            watcher.cancel()
            if not work.done():  # this task itself was cancelled (server shutdown)
                work.cancel()
            metrics.in_flight.dec()
