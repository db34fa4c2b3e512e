"""Resuming a broken stream: the state both clients keep across the calls of one request.

A stream the scheduler accepted (its initial metadata says ``alise-accepted``) that ends with
UNAVAILABLE (the scheduler restarted or failed over, or nothing answered for a moment) is
resumed: the same request is sent again with the same request id and
the output tokens received so far (``resume_token_ids``), and the new stream continues at the
next token, so the caller sees every token once, in order. The scheduler picks the job up
where a worker kept it, or recomputes it from the prompt and those tokens. UNAVAILABLE is not
resumed when the scheduler says so (trailing ``alise-resumable: 0``: no worker came in time),
and resuming stops ``resume_timeout_s`` after the last progress.

A request sent with ``wait_for_ready`` whose call ends UNAVAILABLE before a scheduler
accepted it (the scheduler froze or died as the request arrived, or it is restarting or
draining) is sent again the same way, under the same id, unless a scheduler said not to: the
caller asked to wait for a scheduler.
"""

from __future__ import annotations

import time
import uuid

import grpc

from alise.client.errors import AliseError
from alise.client.types import Chunk
from alise.v1 import scheduler_pb2


class Resumer:
    def __init__(self, request: scheduler_pb2.GenerateRequest, *, resume_timeout_s: float,
                 timeout_s: float | None, wait_for_ready: bool = False) -> None:
        if not request.request_id:
            request.request_id = uuid.uuid4().hex  # a resumed stream is found by its id
        self.request = request
        self.resume_timeout_s = resume_timeout_s
        self.wait_for_ready = wait_for_ready
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.received: list[int] = []
        self.attempts = 0
        #: A scheduler took the request (before that, an error is the caller's to see).
        self.accepted = False
        self._stalled_since: float | None = None

    def next_request(self) -> tuple[scheduler_pb2.GenerateRequest, float | None]:
        """The request to send now, and the call's timeout (what is left of the deadline)."""
        del self.request.resume_token_ids[:]
        self.request.resume_token_ids.extend(self.received)
        left = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)
        return self.request, left

    def accept(self, chunk: Chunk) -> None:
        if chunk.index != len(self.received):
            raise AliseError(grpc.StatusCode.INTERNAL, f"the stream went on at token {chunk.index}; "
                             f"the client has {len(self.received)}")
        self.received += chunk.token_ids
        self._stalled_since = None
        self.attempts = 0

    def note_metadata(self, metadata) -> None:
        if any(key == "alise-accepted" for key, _ in metadata or ()):
            self.accepted = True

    def retry_after(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before resuming after ``error``, or None: do not resume."""
        if self.resume_timeout_s <= 0 or error.code() is not grpc.StatusCode.UNAVAILABLE:
            return None
        trailing = dict(error.trailing_metadata() or ())
        if trailing.get("alise-resumable") == "0":
            return None
        if not self.accepted and not self.wait_for_ready:
            return None
        now = time.monotonic()
        self._stalled_since = self._stalled_since or now
        if now - self._stalled_since > self.resume_timeout_s or (self.deadline and now > self.deadline):
            return None
        self.attempts += 1
        return min(0.1 * 2 ** self.attempts, 2.0)
