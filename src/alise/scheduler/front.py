"""The scheduler's client front: a process of its own that holds the client listener.

Started by the planning process (``alise.scheduler.front_link``) when the scheduler runs with
``streams_process``: it serves SchedulerService on the client address with the listener's
own guards (authentication, the call limit, the Generate precheck), health from the
scheduler's status and reflection, and relays each call to the planning process, which
handles it. Everything per token after the plan happens here: reading the replies (one frame
for all the streams a turn of the planning loop fed), detokenizing them (``TextDeltas``) and
writing each client's stream. The planning process's CPU is left to plans and workers.

A client that goes is told to the planning process (``CallEnded``), which cancels the call as
gRPC would. When the planning process goes (its socket closes), every call in flight ends
UNAVAILABLE, resumable as a scheduler's failure is, and the front exits; SIGINT and SIGTERM
are the planning process's to act on (it drains, then stops the front). The front sends a
``Heartbeat`` every ``HEARTBEAT_INTERVAL_S``: a front that stops turning is killed by the
planning process, which then fails as for a front that died.

    python -m alise.scheduler.front FD      (FD: the front's end of the socket pair)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import socket
import sys
import time
from collections import deque

import grpc

from alise.common import grpc_server
from alise.common.logs import configure_logging
from alise.common.security import bind_port
from alise.modelinfo.served import load_model_info
from alise.scheduler.detokenizer import TextDeltas
from alise.scheduler.front_wire import (
    HEARTBEAT_INTERVAL_S,
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
from alise.scheduler.listeners import SCHEDULER_SERVICE, WORKER_SERVICE, make_client_listener
from alise.scheduler.request_checks import generate_precheck
from alise.v1 import scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

_SERVICE = "/alise.v1.SchedulerService/"
_PLANNER_GONE = Refused(0, grpc.StatusCode.UNAVAILABLE, "the scheduler failed and is restarting; retry",
                        (("alise-resumable", "1"),))
_PLANNER_STALLED = Refused(0, grpc.StatusCode.UNAVAILABLE, "the scheduler is not answering; retry",
                           (("alise-resumable", "1"),))


class PendingCall:
    """One relayed call's replies, until its handler here writes them."""

    def __init__(self) -> None:
        self.items: deque = deque()
        self.wakeup = asyncio.Event()

    def push(self, item) -> None:
        self.items.append(item)
        self.wakeup.set()

    async def next_batch(self) -> list:
        while not self.items:
            self.wakeup.clear()
            await self.wakeup.wait()
        items = list(self.items)
        self.items.clear()
        return items


class PlannerLink:
    """The front's side of the socket pair: calls out, their replies in."""

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer
        self.calls: dict[int, PendingCall] = {}
        self._ids = itertools.count(1)
        self.gone = False
        #: No frame from the planning process for STALL_AFTER_S: calls fail fast meanwhile.
        self.stalled = False
        self.last_heard_s = time.monotonic()

    async def call(self, method: str, request, context, response_type):
        """Relays one call; yields its responses and ends as the planning process ends it."""
        if self.gone or self.stalled:
            await _abort(context, _PLANNER_GONE if self.gone else _PLANNER_STALLED)
        call_id = next(self._ids)
        pending = self.calls[call_id] = PendingCall()
        self.writer.send(CallStarted(call_id, _SERVICE + method, request.SerializeToString()))
        try:
            while True:
                for item in await pending.next_batch():
                    match item:
                        case Reply(_, data):
                            yield response_type.FromString(data)
                        case InitialMetadata(_, metadata):
                            await context.send_initial_metadata(metadata)
                        case Finished():
                            return
                        case Refused():
                            await _abort(context, item)
        finally:
            # Still listed: the planning process has not ended the call, its client is gone.
            if self.calls.pop(call_id, None) is not None and not self.gone:
                self.writer.send(CallEnded(call_id))

    def deliver(self, message) -> None:
        """A reply for a call; the call leaves ``calls`` with its last one."""
        match message:
            case Finished(call_id) | Refused(call_id):
                pending = self.calls.pop(call_id, None)
            case _:
                pending = self.calls.get(message.call_id)
        if pending is not None:
            pending.push(message)

    def heard(self) -> None:
        self.last_heard_s = time.monotonic()
        if self.stalled:
            self.stalled = False
            logger.warning("the scheduler's planning process answers again")

    def check_stalled(self) -> None:
        """A planning process silent for STALL_AFTER_S: its calls in flight fail (resumable)
        and end there too (it cancels them once it runs again)."""
        silent_s = time.monotonic() - self.last_heard_s
        if self.stalled or self.gone or silent_s <= STALL_AFTER_S:
            return
        self.stalled = True
        logger.error("the scheduler's planning process has not answered for %.1f s; failing its %d calls "
                     "(resumable) until it does", silent_s, len(self.calls))
        for call_id, pending in self.calls.items():
            pending.push(_PLANNER_STALLED)
            self.writer.send(CallEnded(call_id))
        self.calls.clear()

    def fail_all(self) -> None:
        """The planning process is gone: every call ends UNAVAILABLE (resumable)."""
        self.gone = True
        for pending in self.calls.values():
            pending.push(_PLANNER_GONE)
        self.calls.clear()


async def _abort(context, refused: Refused) -> None:
    await context.abort(refused.code, refused.details, trailing_metadata=refused.trailing)


class RelayServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """SchedulerService, relayed to the planning process; Generate's text is made here."""

    def __init__(self, link: PlannerLink, tokenizer) -> None:
        self.link = link
        self.tokenizer = tokenizer

    async def Generate(self, request, context):
        texts = TextDeltas(self.tokenizer, request)
        async for response in self.link.call("Generate", request, context, scheduler_pb2.GenerateResponse):
            yield texts.fill(response)

    async def GetStatus(self, request, context):
        return await self._unary("GetStatus", request, context, scheduler_pb2.GetStatusResponse)

    async def GetMetrics(self, request, context):
        return await self._unary("GetMetrics", request, context, scheduler_pb2.GetMetricsResponse)

    async def _unary(self, method: str, request, context, response_type):
        responses = [r async for r in self.link.call(method, request, context, response_type)]
        return responses[-1]


async def serve(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    reader, raw_writer = await asyncio.open_unix_connection(sock=sock)
    writer = FrameWriter(raw_writer)
    try:
        setup = (await read_frame(reader))[0]
    except asyncio.IncompleteReadError:
        return 1
    assert isinstance(setup, FrontSetup), setup
    config = setup.config
    info = await asyncio.to_thread(load_model_info, config.model, config.max_model_len)
    health = grpc_server.ServingStatus([SCHEDULER_SERVICE, WORKER_SERVICE])
    for name, serving in setup.health.items():
        await health.set_one(name, serving)
    link = PlannerLink(writer)
    server = await make_client_listener(config, RelayServicer(link, info.tokenizer), health,
                                        prechecks={_SERVICE + "Generate": generate_precheck(info.max_model_len)})
    port = bind_port(server, config.address, config.security, internal=False)
    await server.start()
    writer.send(Listening(port))
    stop = asyncio.Future()
    reading = asyncio.ensure_future(_read(reader, link, health, stop))
    watching = asyncio.ensure_future(_watch(link))
    beating = asyncio.ensure_future(_beat(writer))
    try:
        # Replies keep coming in while the listener stops: the calls in flight end as the
        # planning process ends them (drained, or failed resumable).
        grace_s = await stop
        await server.stop(grace_s)
    finally:
        reading.cancel()
        watching.cancel()
        beating.cancel()
    return 1 if link.gone else 0


async def _watch(link: PlannerLink) -> None:
    while True:
        await asyncio.sleep(STALL_AFTER_S / 10)
        link.check_stalled()


async def _beat(writer: FrameWriter) -> None:
    while True:
        writer.send(Heartbeat())
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)


async def _read(reader: asyncio.StreamReader, link: PlannerLink, health: grpc_server.ServingStatus,
                stop: asyncio.Future) -> None:
    try:
        while True:
            frame = await read_frame(reader)
            link.heard()
            for message in frame:
                match message:
                    case Heartbeat():
                        pass
                    case HealthChanged(name, serving):
                        await health.set_one(name, serving)
                    case StopListening(grace_s):
                        if not stop.done():
                            stop.set_result(grace_s)
                    case _:
                        link.deliver(message)
    except (asyncio.IncompleteReadError, ConnectionError):
        # Draining or not (a StopListening before it), no reply comes any more.
        logger.error("the scheduler's planning process is gone; the client front stops")
        link.fail_all()
        if not stop.done():
            stop.set_result(0.2)  # its calls are failed already: free the port for the restart


def main() -> int:
    configure_logging("scheduler")
    for sig in (signal.SIGINT, signal.SIGTERM):  # the planning process drains, then stops us
        signal.signal(sig, signal.SIG_IGN)
    return asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    sys.exit(main())
