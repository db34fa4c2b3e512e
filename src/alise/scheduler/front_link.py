"""The planning process's side of the client front (``alise.scheduler.front``).

With ``streams_process`` the scheduler's clients connect to a process of their own, the
front, which holds the client listener, writes every token stream and detokenizes it. This
process keeps the queue, the plans and the worker links, and runs each client call the front
relays through the same servicer methods as its own listener would (``RelayedCall``), with a
context that turns ``abort`` and ``send_initial_metadata`` into messages: one implementation
of each request's handling, whichever process the client is connected to. A client that goes
is a cancel of the call's task here, as a gRPC cancel is, so the handler's ``finally`` frees
its job the same way.

The messages of one turn of this process's event loop (the replies of every stream a report
fed) go to the front as one frame (``alise.scheduler.front_wire``).

The front lives as long as this process: a front that exits on its own is a failure of the
scheduler (``on_lost``: it stops serving and exits non-zero, and its clients resume their
streams on the restarted one); the front exits when its socket closes, so it never outlives
this process, and fails its calls fast while this process is frozen (``Heartbeat``). A front
that is frozen (no frame from it for ``STALL_AFTER_S``) or leaves ``MAX_UNREAD_BYTES`` unread
is a failure too: it holds the client listener and every client's connection, so nothing
here can reach them. This process kills it (its clients' connections break, which the SDK
resumes; its port is free for the restart) and fails as for a front that exited, so what it
buffers for the front stays bounded and no client waits on a front that does not turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterable

import grpc

from alise.common.grpc_server import ServingStatus
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.front_wire import (
    HEARTBEAT_INTERVAL_S,
    MAX_UNREAD_BYTES,
    STALL_AFTER_S,
    CallEnded,
    CallStarted,
    Finished,
    FrameWriter,
    FrontSetup,
    HealthChanged,
    Heartbeat,
    InitialMetadata,
    Listening,
    Refused,
    Reply,
    StopListening,
    read_frame,
)
from alise.v1 import scheduler_pb2

logger = logging.getLogger(__name__)

#: Seconds the front may take to load the tokenizer and bind the client listener.
START_TIMEOUT_S = 120.0
_SERVICE = "/alise.v1.SchedulerService/"


class RelayedStatus(ServingStatus):
    """The scheduler's health, also told to the front (which answers health checks)."""

    def __init__(self, service_names: Iterable[str]) -> None:
        super().__init__(service_names)
        self.current: dict[str, bool] = {}
        self.on_change: Callable[[str, bool], None] | None = None

    async def set_one(self, name: str, serving: bool) -> None:
        await super().set_one(name, serving)
        self.current[name] = serving
        if self.on_change is not None:
            self.on_change(name, serving)


class CallAborted(Exception):
    """The relayed call ended with a status (already sent to the front)."""


class RelayedContext:
    """The part of ``grpc.aio.ServicerContext`` the scheduler's handlers use, for a call the
    front relays."""

    def __init__(self, writer: FrameWriter, call_id: int) -> None:
        self._writer = writer
        self._call_id = call_id

    async def send_initial_metadata(self, metadata) -> None:
        self._writer.send(InitialMetadata(self._call_id, tuple(metadata)))

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        self._writer.send(Refused(self._call_id, code, details, tuple(trailing_metadata)))
        raise CallAborted(code.name)


class FrontProcess:
    """The front process and the calls it relays; ``port`` is its client listener's."""

    def __init__(self, servicer, status: RelayedStatus, on_lost: Callable[[], None]) -> None:
        self.servicer = servicer
        self.status = status
        self.on_lost = on_lost
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: FrameWriter | None = None
        self._calls: dict[int, asyncio.Task] = {}
        self._reader_task: asyncio.Task | None = None
        self._beat_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._last_heard_s = 0.0
        self._stopping = False
        self._lost = False
        # method name -> (request type, handler, streams its responses)
        self._methods = {
            _SERVICE + "Generate": (scheduler_pb2.GenerateRequest, servicer.responses, True),
            _SERVICE + "GetStatus": (scheduler_pb2.GetStatusRequest, servicer.GetStatus, False),
            _SERVICE + "GetMetrics": (scheduler_pb2.GetMetricsRequest, servicer.GetMetrics, False),
        }

    async def start(self, config: SchedulerConfig) -> int:
        """Starts the front and returns once its listener serves (its port), or raises."""
        ours, theirs = socket.socketpair()
        with theirs:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "alise.scheduler.front", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._writer = FrameWriter(writer, MAX_UNREAD_BYTES, on_full=self._on_full)
        self._writer.send(FrontSetup(config, dict(self.status.current)))
        self.status.on_change = lambda name, serving: self._writer.send(HealthChanged(name, serving))
        try:
            first = await asyncio.wait_for(read_frame(reader), START_TIMEOUT_S)
        except (asyncio.IncompleteReadError, TimeoutError):
            await self._end_process(0.0)
            raise RuntimeError("the scheduler's client front did not start (see its log above)") from None
        match first:
            case [Listening(port)]:
                self.port = port
            case _:
                await self._end_process(0.0)
                raise RuntimeError(f"the scheduler's client front answered {first!r}, not its port")
        self._reader_task = asyncio.create_task(self._read(reader), name="scheduler-front-link")
        self._beat_task = asyncio.create_task(self._beat(), name="scheduler-front-heartbeat")
        self._last_heard_s = time.monotonic()
        self._watch_task = asyncio.create_task(self._watch(), name="scheduler-front-watch")
        logger.info("client front (pid %d) serves clients on port %d", self._proc.pid, self.port)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stops the front's listener (``grace_s`` for calls in flight) and the front."""
        self._stopping = True
        for task in (self._beat_task, self._watch_task):
            if task is not None:
                task.cancel()
        if self._writer is not None and not self._writer.writer.is_closing():
            self._writer.send(StopListening(grace_s))
            with contextlib.suppress(ConnectionError, TimeoutError):  # a front that does not read
                await asyncio.wait_for(self._writer.drain(), STALL_AFTER_S)
        await self._end_process(grace_s + 5.0)
        if self._reader_task is not None:
            self._reader_task.cancel()
        for task in list(self._calls.values()):
            task.cancel()

    async def _end_process(self, timeout_s: float) -> None:
        if self._proc is None:
            return
        try:
            await asyncio.wait_for(self._proc.wait(), timeout_s)
        except TimeoutError:
            logger.warning("the client front did not exit within %.1f s; killing it", timeout_s)
            self._proc.kill()
            await self._proc.wait()
        if self._writer is not None:
            self._writer.writer.close()

    async def _beat(self) -> None:
        while True:
            self._writer.send(Heartbeat())
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _watch(self) -> None:
        """Fails the scheduler once the front is silent for STALL_AFTER_S, counting only the
        time this loop turned: while it is blocked, the front's frames wait unread."""
        tick_s = STALL_AFTER_S / 10
        last_tick_s = time.monotonic()
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            late_s = now - last_tick_s - tick_s
            last_tick_s = now
            if late_s > tick_s:
                self._last_heard_s = min(now, self._last_heard_s + late_s)
            if (silent_s := now - self._last_heard_s) > STALL_AFTER_S:
                self._lose(f"has not been heard from for {silent_s:.1f} s (frozen, or its loop blocked)")
                return

    def _on_full(self, num_unread: int) -> None:
        self._lose(f"left {num_unread / 2**20:.1f} MiB unread (the bound is "
                   f"{self._writer.max_unread_bytes / 2**20:.1f} MiB)")

    def _lose(self, reason: str) -> None:
        """The front is gone or stalled: the scheduler fails (``on_lost``), once. A stalled front
        is killed, and what is buffered for it dropped: it serves no client any more, and its
        port and connections are the restarted scheduler's to take."""
        if self._stopping or self._lost:
            return
        self._lost = True
        logger.error("the scheduler's client front %s; the scheduler stops", reason)
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._writer.writer.transport.abort()
        self.on_lost()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                self._last_heard_s = time.monotonic()
                for message in frame:
                    match message:
                        case Heartbeat():
                            pass
                        case CallStarted(call_id, method, request):
                            self._start_call(call_id, method, request)
                        case CallEnded(call_id):
                            if (task := self._calls.get(call_id)) is not None:
                                task.cancel()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self._lose("exited")

    def _start_call(self, call_id: int, method: str, request: bytes) -> None:
        request_type, handler, streaming = self._methods[method]
        task = asyncio.ensure_future(self._run(call_id, handler, request_type.FromString(request), streaming))
        self._calls[call_id] = task
        task.add_done_callback(lambda _: self._calls.pop(call_id, None))

    async def _run(self, call_id: int, handler, request, streaming: bool) -> None:
        """One relayed call, as gRPC would run it: its replies, then OK or its status."""
        send = self._writer.send
        context = RelayedContext(self._writer, call_id)
        try:
            if streaming:
                async with contextlib.aclosing(handler(request, context)) as responses:
                    async for response in responses:
                        send(Reply(call_id, response.SerializeToString()))
            else:
                send(Reply(call_id, (await handler(request, context)).SerializeToString()))
            send(Finished(call_id))
        except CallAborted:
            pass
        except Exception:
            logger.exception("relayed call %s failed", method_name(handler))
            send(Refused(call_id, grpc.StatusCode.UNKNOWN, "the scheduler failed to answer this call"))


def method_name(handler) -> str:
    return getattr(handler, "__name__", repr(handler))
