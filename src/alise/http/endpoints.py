"""``POST /v1/completions`` and ``POST /v1/chat/completions``, as raw ASGI endpoints.

Raw ASGI rather than a framework response class, because the door needs two things most
response helpers hide: the status line waits for the scheduler's verdict (``relay``), and the
connection is watched from the moment the body is read: a client that goes away, while
queued, streaming or waiting for a whole completion, cancels its gRPC call at once.

Before anything is relayed, a request is read within ``body_timeout_s`` (408 past it) and
within the largest body the door can accept (``Door.max_body_bytes``: 413 from its
Content-Length before any of it is read, else as soon as the bytes read pass it), parsed,
checked for text that cannot be encoded (a lone UTF-16 surrogate: 400), its caller checked by
the scheduler when the model it names is not the one served (401 before the 404 that names the
served model), its text bounded in characters (as the scheduler bounds it) and a chat's
messages rendered off the event loop (a burst's chats in one batch, in the order they came, so
the door hands a burst to the scheduler in its order). Refusals are logged at most 20 at once
and 2 a second; an exception no check expected is answered 500 and logged in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid

from starlette.requests import ClientDisconnect, Request

from alise.client import AliseError, Conversation
from alise.client._convert import is_carriable_token
from alise.common.batches import InOrderBatches, outcome
from alise.common.logs import preview, request_id_var
from alise.http.chat import ChatRenderer, check_length
from alise.http.errors import ApiError, bad_request
from alise.http.logprobs import LogprobShaper
from alise.http.protocol import SURROGATE_ESCAPE, GenerationRequest, lone_surrogate_at, parse_request
from alise.http.relay import Relay, send_json
from alise.http.shapes import Facts, Shaper
from alise.scheduler.request_checks import check_request_id, max_text_chars, text_too_long

logger = logging.getLogger(__name__)

#: HTTP status recorded for a client that closed the connection first (nginx's convention).
CLIENT_CLOSED = 499


async def read_json(request: Request, max_bytes: int, timeout_s: float, why: str = ""):
    """The body, parsed. A body over ``max_bytes`` is refused (413) before any of it is read when
    its Content-Length says so, else as soon as the bytes read pass it (chunked or lying);
    ``why`` says where the limit comes from."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body has {int(declared)} bytes; the limit is {max_bytes}{why}",
                       code="body_too_large")
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > max_bytes:
                    raise ApiError(413, f"the request body exceeds the limit of {max_bytes} bytes{why}",
                                   code="body_too_large")
                parts.append(part)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout") from None
    except ClientDisconnect:  # nobody reads the answer; it is counted, not logged as an error
        raise ApiError(CLIENT_CLOSED, "the client closed the connection before its body arrived",
                       code="client_closed") from None
    raw = b"".join(parts)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    where = lone_surrogate_at(body) if SURROGATE_ESCAPE.search(raw) else None
    if where is not None:
        raise bad_request(f"{where} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                          "its pair): text must be valid Unicode", param=where, code="invalid_unicode")
    return body


def render_chat(renderer: ChatRenderer, req: GenerationRequest
                ) -> tuple[str | list[int], Conversation | None]:
    """Blocking (a template and a tokenizer run): the prompt and the conversation it continues."""
    return renderer.render(req.messages, req.template_kwargs), renderer.conversation(req.messages)


def render_chats(items: list[tuple[ChatRenderer, GenerationRequest]]
                 ) -> list[tuple[str | list[int], Conversation | None] | BaseException]:
    """Blocking: ``render_chat`` of each item, or the exception it raised (one bad set of
    messages fails alone)."""
    return [outcome(lambda r=renderer, q=req: render_chat(r, q)) for renderer, req in items]


def bearer_token(request: Request) -> str | None:
    """The request's bearer token; None without one, or for one no gRPC header can carry (it
    is no credential: the scheduler decides whether one is needed)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token and is_carriable_token(token) else None


async def until_disconnect(receive) -> None:
    """Returns when the client has gone (or the response is complete: the server says so too)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class CompletionEndpoint:
    def __init__(self, door, *, chat: bool) -> None:
        self.door = door
        self.chat = chat
        self.route = "chat" if chat else "completions"
        #: Chats rendered off the event loop, a burst's together and in the order it came.
        self.renders = InOrderBatches(render_chats)

    async def __call__(self, scope, receive, send) -> None:
        arrival_s = time.monotonic()
        request = Request(scope, receive)
        request_id_var.set(uuid.uuid4().hex)
        token = bearer_token(request)
        try:
            req, prompt, served, request_id = await self._prepare(request, token)
        except (ApiError, AliseError) as exc:
            error = exc if isinstance(exc, ApiError) else self.door.api_error(exc)
            self.door.refusals.log(logging.INFO, "refused: %d %s", error.status, preview(error.message))
            self.door.metrics.requests.labels(self.route, str(error.status)).inc()
            await send_json(send, error.status, error.body(), error.headers())
            return
        facts = Facts(request_id)
        logprobs = None if req.logprobs is None else LogprobShaper(
            chat=self.chat, num_top=req.logprobs, text_of=served.renderer.token_text)
        shaper = Shaper(chat=self.chat, request_id=request_id, model=served.name,
                        return_token_ids=req.return_token_ids, alise_stats=req.alise_stats, logprobs=logprobs)
        relay = Relay(self.door, req, prompt, shaper, facts, token, arrival_s)
        await self._race(relay, send, receive)
        self.door.metrics.requests.labels(self.route, str(relay.status)).inc()
        logger.info("%s %d: %d prompt + %d completion tokens, finish %s, %.3f s%s", self.route,
                    relay.status, facts.prompt_tokens, facts.completion_tokens, relay.finish_reason or "-",
                    time.monotonic() - arrival_s, f", user {preview(req.user)}" if req.user else "")

    async def _prepare(self, request: Request, token: str | None):
        config = self.door.config
        if self.door.draining:
            raise ApiError(503, "the server is shutting down; retry", code="shutting_down", retry_after_s=2)
        body = await read_json(request, self.door.max_body_bytes(), config.body_timeout_s,
                               self.door.body_limit_reason())
        req = parse_request(body, chat=self.chat)
        request_id = request_id_var.get()
        if req.request_id is not None:
            try:
                request_id = check_request_id(req.request_id)
            except ValueError as exc:
                raise bad_request(str(exc), param="request_id") from None
            request_id_var.set(request_id)
        served = await self.door.served_model(token)
        if req.model is not None and req.model != served.name:
            await self.door.check_caller(token)  # who may not call the scheduler learns nothing
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves "
                           f"`{served.name}`.", param="model", code="model_not_found")
        if not self.chat:
            # The scheduler's own first check, made here too: megabytes of text refused by the
            # scheduler would first go through the one connection every request shares.
            if isinstance(req.prompt, str) and len(req.prompt) > max_text_chars(served.max_model_len):
                raise bad_request(text_too_long(len(req.prompt), served.max_model_len), param="prompt")
            return req, req.prompt, served, request_id
        check_length(req.messages, served.max_model_len)
        prompt, conversation = await self.renders.run((served.renderer, req))
        return dataclasses.replace(req, conversation=conversation), prompt, served, request_id

    async def _race(self, relay: Relay, send, receive) -> None:
        """Runs the relay until it ends, the client leaves (which cancels the gRPC call) or the
        door stops (which ends it with a last event)."""
        door, metrics = self.door, self.door.metrics
        metrics.in_flight.inc()
        door.num_in_flight += 1
        work = asyncio.ensure_future(relay.run(send))
        watcher = asyncio.ensure_future(until_disconnect(receive))
        closing = asyncio.ensure_future(door.closing.wait())
        try:
            await asyncio.wait({work, watcher, closing}, return_when=asyncio.FIRST_COMPLETED)
            if work.done() or relay.done:
                await work
                return
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            if closing.done() and not watcher.done():
                await relay.end_for_shutdown(send)
                return
            metrics.disconnects.inc()
            relay.status = CLIENT_CLOSED
            logger.info("client closed the connection: request cancelled")
        except Exception as exc:  # a bug, not the client's doing: one line, then 500
            door.log_error(f"{self.route}: relaying failed", exc)
            error = ApiError(500, "internal error in the HTTP door", code="internal")
            with contextlib.suppress(Exception):
                if not relay.status:
                    await relay.refuse(send, error)
                elif not relay.done:
                    await relay.end_with_error(send, error)
        finally:
            watcher.cancel()
            closing.cancel()
            if not work.done():  # this task itself was cancelled (server shutdown)
                work.cancel()
            metrics.in_flight.dec()
            door.num_in_flight -= 1
