"""What the gRPC handlers tell the scheduler's engine loop: typed events through one inbox.

Handlers never touch the core. They post an event (a new job, a client gone, a new length
estimate, a worker's hello, report or departure) and return; the loop takes every event
posted so far at once and applies them in order (``alise.scheduler.engine``).

The inbox also says whether the loop has caught up (``caught_up``): cleared by every post,
set by the loop once it has applied everything posted and sent the plans that follow. The
client streams wake their handlers only while it is set (``alise.scheduler.streams``), so
the per-token work of the streams (detokenizing, writing to clients) never runs ahead of a
report the loop has to turn into a plan.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from alise.core.commands import StepReport
from alise.core.job import Job, LengthEstimate
from alise.scheduler.worker_link import WorkerLink


@dataclass(frozen=True)
class Submit:
    """A client's new job (its stream is already open)."""

    job: Job


@dataclass(frozen=True)
class Cancel:
    """The client of ``job_id`` is gone (cancelled, disconnected, past its deadline)."""

    job_id: str


@dataclass(frozen=True)
class NewEstimate:
    """The predictor's length estimate of a job queued with a prior one."""

    job_id: str
    estimate: LengthEstimate


@dataclass(frozen=True)
class WorkerJoined:
    link: WorkerLink


@dataclass(frozen=True)
class WorkerReported:
    worker_id: str
    report: StepReport


@dataclass(frozen=True)
class WorkerLeft:
    worker_id: str


@dataclass(frozen=True)
class Stop:
    """The loop ends after this batch."""


Event = Submit | Cancel | NewEstimate | WorkerJoined | WorkerReported | WorkerLeft | Stop


class Inbox:
    """The engine loop's events, in the order posted (unbounded: every poster is bounded by
    its own limits: the queue cap, one report per plan in flight)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        #: Set while nothing posted waits for the loop.
        self.caught_up = asyncio.Event()
        self.caught_up.set()

    def post(self, event: Event) -> None:
        self._queue.put_nowait(event)
        self.caught_up.clear()

    async def next_batch(self, timeout_s: float) -> list[Event]:
        """Everything posted so far, once there is something (``[]`` after ``timeout_s``)."""
        try:
            first = await asyncio.wait_for(self._queue.get(), timeout=timeout_s)
        except TimeoutError:
            return []
        batch = [first]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    def settle(self) -> None:
        """The loop has applied its batch and sent its plans: caught up unless more came."""
        if self._queue.empty():
            self.caught_up.set()
