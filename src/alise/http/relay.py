"""One request's answer, relayed from the scheduler's stream: an error, a whole completion, or
a stream of Server-Sent Events.

The status line waits for the scheduler's verdict, so a refused request (400, 401, 429, 503)
gets its status and JSON body even when it asked to stream. A stream's status line and
headers go out the moment the scheduler accepts it (its ``alise-accepted`` metadata), while
the job is queued, so the first token is one write; an error after that (the deadline, no
worker in time, the door stopping) travels as an error event and then ``[DONE]``, as vLLM's
do. A whole completion's status waits for its end.

Acceptance is bounded: a scheduler that cannot be reached (restarting) is waited for up to
``scheduler_wait_s`` (never past the request's deadline), one that is reachable but silent
(hung) for ``accept_timeout_s``; then the answer is 503 with Retry-After (``Door.wait_bound_s``).
"""

from __future__ import annotations

import asyncio
import json
import time

from alise.client import AliseError
from alise.http.errors import ApiError, unavailable
from alise.http.generation import Piece, pieces
from alise.http.protocol import GenerationRequest
from alise.http.shapes import SSE_DONE, Facts, Shaper, sse

#: How often a request waiting for acceptance looks again at how long it may wait.
_RECHECK_S = 0.25


async def send_json(send, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


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
        accepted = asyncio.Event()

        async def on_accepted() -> None:
            accepted.set()
            if self.req.stream:
                await self._open(send)

        stream = pieces(self.door.client, self.req, self.prompt, self.facts, token=self.token,
                        timeout_s=self.door.config.request_timeout_s, on_accepted=on_accepted)
        # The first piece is awaited in a task of its own so that waiting for acceptance can
        # be bounded apart from the request's deadline; cancelling it closes the gRPC call.
        first = asyncio.ensure_future(anext(stream))
        try:
            await self._until_accepted(first, accepted)
            piece = await first
        except ApiError as error:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await self.refuse(send, error)
            return
        except AliseError as exc:
            if self.status:  # the stream is open: the error is its last event
                await self.end_with_error(send, self.door.api_error(exc))
            else:
                await self.refuse(send, self.door.api_error(exc))
            return
        finally:
            if not first.done():  # this relay was cancelled (the client left, the door stops)
                first.cancel()
        self.door.metrics.ttft.observe(time.monotonic() - self.arrival_s)
        if self.req.stream:
            await self._stream(piece, stream, send)
        else:
            await self._whole(piece, stream, send)

    async def _until_accepted(self, first: asyncio.Future, accepted: asyncio.Event) -> None:
        """Returns once the scheduler accepted the request (or answered it: ``first`` is done);
        raises a 503 when it has not within the door's bound, which is looked at again as the
        scheduler's health changes (it may turn out to be restarting)."""
        started = time.monotonic()
        signal = asyncio.ensure_future(accepted.wait())
        try:
            while not (first.done() or accepted.is_set()):
                bound = self.door.wait_bound_s()
                left = started + bound - time.monotonic()
                if left <= 0:
                    raise unavailable(f"the scheduler accepted nothing within {bound:g} s (it may be "
                                      f"restarting or overloaded); retry shortly")
                await asyncio.wait({first, signal}, timeout=min(left, _RECHECK_S),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            signal.cancel()

    async def refuse(self, send, error: ApiError) -> None:
        self.status, self.done = error.status, True
        await send_json(send, error.status, error.body(), error.headers())

    async def _whole(self, piece: Piece, stream, send) -> None:
        texts, ids, logprobs = [piece.text], list(piece.token_ids), list(piece.logprobs or ())
        try:
            while piece.finish_reason is None:
                piece = await anext(stream)
                texts.append(piece.text)
                ids.extend(piece.token_ids)
                logprobs.extend(piece.logprobs or ())
        except AliseError as exc:
            await self.refuse(send, self.door.api_error(exc))
            return
        self._finished(piece.finish_reason)
        self.status, self.done = 200, True
        await send_json(send, 200, self.shaper.whole("".join(texts), ids, piece.finish_reason, self.facts, logprobs),
                        {"x-request-id": self.facts.request_id})

    def _finished(self, finish_reason: str) -> None:
        self.finish_reason = finish_reason
        if self.facts.stopped_by_string:
            self.door.metrics.stopped_by_string(time.monotonic() - self.arrival_s, self.facts.prompt_tokens,
                                                self.facts.completion_tokens, self.req.max_tokens)

    async def _event(self, send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _open(self, send) -> None:
        """The stream's status line and headers, once accepted."""
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-request-id", self.facts.request_id.encode())]})
        self.status = 200  # after the send: a relay cancelled during it has sent no status line

    async def end_with_error(self, send, error: ApiError) -> None:
        """The last events of an open stream: the error, then ``[DONE]``."""
        self.finish_reason = f"error {error.status}"
        await self._event(send, sse(error.body()))
        self.done = True
        await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})

    async def end_for_shutdown(self, send) -> None:
        """The door is stopping and this request is not done: a stream gets a last error event
        (what the OpenAI clients raise as an APIError) and ``[DONE]``; otherwise a 503."""
        error = unavailable("the server is shutting down; retry", code="shutting_down")
        if self.status:
            await self.end_with_error(send, error)
        else:
            await self.refuse(send, error)

    async def _stream(self, piece: Piece, stream, send) -> None:
        if not self.status:  # the scheduler's metadata did not come first (it always does)
            await self._open(send)
        shaper, req = self.shaper, self.req
        # NOTE: a chat's role event goes just before its first token's, not at acceptance, as
        # vLLM sends it: clients (vllm bench serve) time the first token from the first event,
        # so a role event sent while the job is queued would hide the wait.
        role_pending = shaper.chat
        try:
            while True:
                # One event per piece that carries tokens, text or not (as vLLM sends them):
                # clients time inter-token latency between events, and a token that adds no
                # text yet (a partial character, a held-back stop-string prefix) is still one.
                if piece.token_ids or piece.text or piece.finish_reason is not None:
                    if role_pending:
                        await self._event(send, sse(shaper.role_chunk(req.include_usage)))
                        role_pending = False
                    await self._event(send, sse(shaper.chunk(piece.text, piece.token_ids, piece.finish_reason,
                                                             self.facts, req.include_usage, req.continuous_usage,
                                                             piece.logprobs)))
                if piece.finish_reason is not None:
                    break
                piece = await anext(stream)
            self._finished(piece.finish_reason)
            if req.include_usage:
                await self._event(send, sse(shaper.usage_chunk(self.facts)))
        except AliseError as exc:
            await self.end_with_error(send, self.door.api_error(exc))
            return
        self.done = True
        await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})
