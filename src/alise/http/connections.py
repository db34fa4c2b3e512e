"""Connections the door holds, bounded so idle or trickling clients hold no one else up.

uvicorn bounds a kept-alive connection's idle time (``timeout_keep_alive``) but not a fresh
connection that sends nothing, nor a request whose headers trickle in, and its
``limit_concurrency`` counts idle connections: a few thousand sockets that send nothing made
it answer 503 to everyone (slowloris). Here, per server:

* a connection's request line and headers must be in within ``header_timeout_s`` of its first
  byte (of opening, for the first request) and within ``max_header_bytes``, else it is
  answered 408 (or 431) and closed; the body has its own bound (``endpoints.read_json``),
  and what is left of a body answered before it was all in (a 413) is dropped as it comes, up
  to ``MAX_DISCARD_BYTES`` and within ``header_timeout_s``, else the connection is closed;
* a connection with no request in progress is *idle*. One client (remote IP) may hold
  ``max_idle_connections_per_client`` idle connections: past that its connections idle
  longest are closed, those idle for ``MIN_IDLE_S`` at least (a burst of fresh connections
  about to send their requests is never cut), when it opens one more and every ``SWEEP_S``
  (at most ``SWEEP_MAX_CLOSES`` a time: closing thousands at once would stall the loop).
  Requests in progress are never counted against a client;
* at ``max_connections`` open, a new connection closes the one idle longest, of any client;
  with none idle it is answered 503 and closed.

Invariants: every connection is in exactly one of ``idle`` and ``busy`` from
``connection_made`` to ``connection_lost``; each dict is ordered by last activity (least
recent first), so the next to close is always its first entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, OrderedDict

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from alise.common.logs import LogLimiter

logger = logging.getLogger(__name__)

#: A connection idle for less than this is never closed to make room for its own client's.
MIN_IDLE_S = 1.0
#: How often the clients over their idle connections are looked for, and how many of their
#: connections one look closes at most.
SWEEP_S = 0.1
SWEEP_MAX_CLOSES = 64
#: The rest of a body answered before it was all in (a 413) is read and dropped, at most this
#: many bytes and within ``header_timeout_s``; past either the connection is closed.
MAX_DISCARD_BYTES = 16 * 1024 * 1024


def _raw_response(status: int, reason: str, message: str, code: str, retry_after_s: int | None = None) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "service_unavailable", "param": None, "code": code}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after_s is not None:
        head.append(f"retry-after: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ConnectionGuard:
    """The bounds above, shared by every connection of one server."""

    def __init__(self, *, max_connections: int, max_idle_per_client: int, header_timeout_s: float,
                 max_header_bytes: int, clock=time.monotonic) -> None:
        self.max_connections = max_connections
        self.max_idle_per_client = max_idle_per_client
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.clock = clock
        #: protocol -> its last activity, least recent first.
        self.idle: OrderedDict[GuardedProtocol, float] = OrderedDict()
        self.busy: OrderedDict[GuardedProtocol, float] = OrderedDict()
        self.idle_by_client: Counter[str] = Counter()
        self.num_closed = Counter()  # why connections were closed: header timeout, evicted, ...
        self._closes = LogLimiter(logger)
        self._sweeping: asyncio.TimerHandle | None = None

    @property
    def num_open(self) -> int:
        return len(self.idle) + len(self.busy)

    def opened(self, conn: GuardedProtocol) -> bool:
        """Registers a new connection; False when there is no room (no idle one to close)."""
        if self.num_open >= self.max_connections:
            if not self.idle:
                return False
            self._close(next(iter(self.idle)), "evicted (the server was at its connection limit)")
        self._make_idle(conn)
        oldest = self._oldest_idle_of(conn.client_host)
        if oldest is not None:
            self._close(oldest, self._over_cap)
        if self._sweeping is None:
            self._sweeping = conn.loop.call_later(SWEEP_S, self._sweep, conn.loop)
        return True

    @property
    def _over_cap(self) -> str:
        return f"evicted (its client holds over {self.max_idle_per_client} idle connections)"

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Closes the connections idle longest of each client over its bound."""
        self._sweeping = None
        over = {host for host, n in self.idle_by_client.items() if n > self.max_idle_per_client}
        if over:
            now, closing, taken = self.clock(), [], Counter()
            for conn, since in self.idle.items():
                if now - since < MIN_IDLE_S or len(closing) == SWEEP_MAX_CLOSES:
                    break
                host = conn.client_host
                if host in over and self.idle_by_client[host] - taken[host] > self.max_idle_per_client:
                    closing.append(conn)
                    taken[host] += 1
            for conn in closing:
                self._close(conn, self._over_cap)
        if self.num_open:
            self._sweeping = loop.call_later(SWEEP_S, self._sweep, loop)

    def _oldest_idle_of(self, host: str) -> GuardedProtocol | None:
        if self.idle_by_client[host] <= self.max_idle_per_client:
            return None
        now = self.clock()
        for conn, since in self.idle.items():
            if now - since < MIN_IDLE_S:
                return None
            if conn.client_host == host:
                return conn
        return None

    def _make_idle(self, conn: GuardedProtocol) -> None:
        self.busy.pop(conn, None)
        self.idle[conn] = self.clock()
        self.idle_by_client[conn.client_host] += 1

    def started(self, conn: GuardedProtocol) -> None:
        """Its request's headers are in: it is busy until the response is complete."""
        if self.idle.pop(conn, None) is not None:
            self._drop_idle_count(conn)
        self.busy[conn] = self.clock()

    def finished(self, conn: GuardedProtocol) -> None:
        if conn in self.busy:
            self._make_idle(conn)

    def active(self, conn: GuardedProtocol) -> None:
        if conn in self.idle:
            self.idle.move_to_end(conn)
            self.idle[conn] = self.clock()

    def lost(self, conn: GuardedProtocol) -> None:
        if self.idle.pop(conn, None) is not None:
            self._drop_idle_count(conn)
        self.busy.pop(conn, None)

    def _drop_idle_count(self, conn: GuardedProtocol) -> None:
        self.idle_by_client[conn.client_host] -= 1
        if not self.idle_by_client[conn.client_host]:
            del self.idle_by_client[conn.client_host]

    def _close(self, conn: GuardedProtocol, why: str) -> None:
        self.lost(conn)
        self.num_closed[why.split(" (")[0]] += 1
        self._closes.log(logging.INFO, "closed a connection from %s: %s", conn.client_host, why)
        conn.transport.close()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under a ``ConnectionGuard`` (subclassed per server with
    its ``guard``: uvicorn constructs protocols from a class)."""

    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.client_host = self.client[0] if self.client else ""
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        #: From a request's headers to the end of its body: bytes in between are body, even
        #: once the request is answered (a body refused early still arrives, and is dropped).
        self._in_body = False
        self._discard_timer: asyncio.TimerHandle | None = None
        self._discard_left = 0
        if not self.guard.opened(self):
            self._refuse(503, "Service Unavailable", "the server is at its connection limit; retry shortly",
                         "too_many_connections", retry_after_s=1)
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.lost(self)
        self._disarm_header_timer()
        self._disarm_discard()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # refused or closed: what it sends goes nowhere
            return
        self.guard.active(self)
        if self._discard_timer is not None:
            self._discard_left -= len(data)
            if self._discard_left < 0:
                self._close_discarding("discard too large")
                return
        is_between = not self._in_body and (self.cycle is None or self.cycle.response_complete)
        if self._header_timer is None and is_between:
            self._arm_header_timer()  # the first bytes of a kept-alive connection's next request
        if self._header_timer is not None:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still waiting for the end of the headers (the timer goes when they are in, so bytes
        # of a body that came in the same read are not held against them).
        if self._header_timer is not None and self._header_bytes > self.guard.max_header_bytes:
            self._refuse(431, "Request Header Fields Too Large",
                         f"the request line and headers exceed {self.guard.max_header_bytes} bytes",
                         "headers_too_large")

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._in_body = True
        self.guard.started(self)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm_discard()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.guard.finished(self)
        if self._in_body and self._discard_timer is None:  # answered before its body was all in
            self._discard_left = MAX_DISCARD_BYTES
            self._discard_timer = self.loop.call_later(self.guard.header_timeout_s, self._close_discarding,
                                                       "discard timeout")
        super().on_response_complete()

    def _disarm_discard(self) -> None:
        if self._discard_timer is not None:
            self._discard_timer.cancel()
            self._discard_timer = None

    def _close_discarding(self, why: str) -> None:
        """The rest of an answered body came too slowly or was too large: closed, no answer
        (one was given)."""
        self._disarm_discard()
        self.guard.num_closed[why] += 1
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """What httptools cannot parse is answered in the door's error shape, as every other
        refusal is (uvicorn's own is text/plain); uvicorn has logged it."""
        self._refuse(400, "Bad Request", "the request is not valid HTTP/1.1", "invalid_http")

    def _arm_header_timer(self) -> None:
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.guard.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self.guard.num_closed["header timeout"] += 1
        self._refuse(408, "Request Timeout", f"the request line and headers did not arrive within "
                     f"{self.guard.header_timeout_s:g} s", "request_timeout")

    def _refuse(self, status: int, reason: str, message: str, code: str, retry_after_s: int | None = None) -> None:
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(status, reason, message, code, retry_after_s))
            self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    return type("DoorProtocol", (GuardedProtocol,), {"guard": guard})
