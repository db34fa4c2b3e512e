"""What the scheduler's planning process and its client front (``alise.scheduler.front``) say
to each other over their socket pair: typed messages, many to a frame.

A frame is a 4-byte little-endian length and a pickled list of messages. Each side queues the
messages of one turn of its event loop and writes them as one frame (``FrameWriter``): one
write for every token stream a worker's step fed, not one per token. The socket pair is the
two processes' own (the planning process creates it and hands one end to the front), so
pickle reads only what the other side wrote.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from alise.scheduler.config import SchedulerConfig

_LENGTH_BYTES = 4
#: Each side sends a frame at least this often (``Heartbeat`` when it has nothing else).
HEARTBEAT_INTERVAL_S = 0.5
#: A side silent this long is stalled (frozen, or its loop blocked). A stalled planning
#: process: the front fails its calls in flight UNAVAILABLE (resumable) and refuses new ones
#: until it hears from it again, as a client's keepalive would a frozen scheduler's listener.
#: A stalled front holds every client connection, so the scheduler can serve none of them:
#: the planning process kills it and fails (``alise.scheduler.front_link``).
STALL_AFTER_S = 2.5
#: The most bytes the planning process leaves unread by the front (beyond the socket's own
#: buffers) before it treats the front as stalled: its output never grows without limit.
MAX_UNREAD_BYTES = 64 << 20


# ----------------------------------------------------------------- planning process -> front

@dataclass(frozen=True, slots=True)
class FrontSetup:
    """The first frame: the scheduler's settings and its health statuses so far."""

    config: SchedulerConfig
    health: dict[str, bool]


@dataclass(frozen=True, slots=True)
class InitialMetadata:
    call_id: int
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """One response of the call, serialized (a GenerateResponse has no text yet: the front
    adds it)."""

    call_id: int
    response: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """The call ended with OK after its replies."""

    call_id: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The call ended with this status (``context.abort`` on the planning side)."""

    call_id: int
    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class HealthChanged:
    name: str
    serving: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The sender's loop is turning (either way)."""


@dataclass(frozen=True, slots=True)
class StopListening:
    """The scheduler stops: the front stops its listener (``grace_s`` for calls in flight)
    and exits."""

    grace_s: float


ToFront = FrontSetup | InitialMetadata | Reply | Finished | Refused | HealthChanged | Heartbeat | StopListening


# ----------------------------------------------------------------- front -> planning process

@dataclass(frozen=True, slots=True)
class Listening:
    """The front's client listener is bound (to ``port``) and serving."""

    port: int


@dataclass(frozen=True, slots=True)
class CallStarted:
    """A client's call of ``method`` (a full gRPC method name), its request serialized."""

    call_id: int
    method: str
    request: bytes


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The client of the call is gone (cancelled, disconnected, past its deadline)."""

    call_id: int


FromFront = Listening | CallStarted | CallEnded | Heartbeat


async def read_frame(reader: asyncio.StreamReader) -> list:
    """The next frame's messages (raises ``asyncio.IncompleteReadError`` at the end)."""
    length = int.from_bytes(await reader.readexactly(_LENGTH_BYTES), "little")
    return pickle.loads(await reader.readexactly(length))


class FrameWriter:
    """Queues messages and writes all those of one turn of the event loop as one frame.

    With ``max_unread_bytes``, the transport never holds more than that plus one frame: the
    frame that passes it makes the writer full (``is_full``; it writes nothing more) and
    calls ``on_full``, once."""

    def __init__(self, writer: asyncio.StreamWriter, max_unread_bytes: int | None = None,
                 on_full: Callable[[int], None] | None = None) -> None:
        self.writer = writer
        self.max_unread_bytes = max_unread_bytes
        self.on_full = on_full
        self.is_full = False
        self._queued: list = []

    def send(self, message) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(message)

    def _flush(self) -> None:
        messages, self._queued = self._queued, []
        if self.writer.is_closing() or self.is_full:
            return
        data = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(len(data).to_bytes(_LENGTH_BYTES, "little") + data)
        if self.max_unread_bytes is not None:
            num_unread = self.writer.transport.get_write_buffer_size()
            if num_unread > self.max_unread_bytes:
                self.is_full = True
                if self.on_full is not None:
                    self.on_full(num_unread)

    async def drain(self) -> None:
        """Writes what is queued now and waits until the socket took it."""
        if self._queued:
            self._flush()
        await self.writer.drain()
