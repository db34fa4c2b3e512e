"""The client streams: where each job's tokens wait for its Generate handler.

A stream opens when a Generate handler submits its job, and leaves ``live`` when the job
finishes, fails or its client goes. The engine loop hands each report's tokens over
(``deliver``: a dictionary look-up and an append, nothing per token beyond that); the
streams' own task (``_pump``) does the rest off the loop: per-token metrics, the finished
job's accounting, and waking each stream's handler, which detokenizes and writes to its
client on its own task. The pump wakes ``WAKE_SLICE`` streams per turn of the event loop and
only while the loop has caught up (``Inbox.caught_up``): a report that arrives while
hundreds of handlers have text to write waits at most a slice or two of them before the
loop turns it into the next plan, never all of them. The loop catches up at the end of each
of its turns, so however fast reports come the streams get at least a slice per turn.

Jobs a returning worker kept (its hello lists them) are adopted by the core and wait here,
running meanwhile, for their clients to resume their streams (``orphans``, each until
``orphan_wait_s`` after the hello); a resume that comes before the worker does waits up to
``adoption_grace_s`` after the scheduler's start for it (``await_adoption``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from alise.common.metrics import SchedulerMetrics
from alise.core.commands import TokenEvent
from alise.core.job import Job
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.messages import Cancel, Inbox, Submit

logger = logging.getLogger(__name__)

#: Streams woken per turn of the event loop (each then detokenizes and writes on its own task).
WAKE_SLICE = 16


class JobFailed(Exception):
    """A job ended without finishing (no worker in time, scheduler shutting down); a
    ``resumable`` one can be resumed by its client from another scheduler (or this one,
    restarted)."""

    def __init__(self, code: str, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.resumable = resumable


class StreamClosing(Exception):
    """The request id belongs to a stream being cancelled: a resume comes a moment early."""


@dataclass(eq=False)
class JobStream:
    """Where a job's tokens wait for its Generate handler."""

    job: Job
    events: deque[TokenEvent | JobFailed] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    #: Its client is gone; the cancel is on its way to the loop.
    closed: bool = False

    def push(self, item: TokenEvent | JobFailed) -> None:
        self.events.append(item)
        self.wakeup.set()

    async def next_batch(self) -> list[TokenEvent | JobFailed]:
        while not self.events:
            self.wakeup.clear()
            await self.wakeup.wait()
        items = list(self.events)
        self.events.clear()
        return items


class Streams:
    def __init__(self, inbox: Inbox, metrics: SchedulerMetrics, *,
                 max_queued: int = SchedulerConfig.max_queued,
                 orphan_wait_s: float = 60.0, adoption_grace_s: float = 10.0,
                 on_finish: Callable[[Job], None] | None = None) -> None:
        self.inbox = inbox
        self.metrics = metrics
        self.max_queued = max_queued
        self.orphan_wait_s = orphan_wait_s
        self.adoption_grace_s = adoption_grace_s
        self.on_finish = on_finish
        self.started_s = time.monotonic()
        self.live: dict[str, JobStream] = {}
        #: Adopted jobs whose client has not resumed its stream yet: job id -> (job, until
        #: when it waits for its client). They run meanwhile.
        self.orphans: dict[str, tuple[Job, float]] = {}
        #: Why no stream opens any more (the scheduler stopped or failed); None while open.
        self.closed: JobFailed | None = None
        self._joined = asyncio.Event()
        #: Tokens handed over by the loop, not yet given to their streams: (stream, event, when).
        self._ready: deque[tuple[JobStream, TokenEvent, float]] = deque()
        self._has_ready = asyncio.Event()
        self._pump_task: asyncio.Task | None = None

    def start(self) -> None:
        self._pump_task = asyncio.create_task(self._pump(), name="scheduler-streams")

    # ----------------------------------------------------------------- handlers' side

    def num_live(self) -> int:
        return len(self.live)

    def open(self, job: Job) -> JobStream:
        """Opens the job's stream and submits it to the loop, or resumes the stream of the
        adopted job of that id. Raises OverflowError when the queue is full, KeyError when the
        id is taken, StreamClosing when its stream is being cancelled, JobFailed once closed."""
        if self.closed is not None:
            raise self.closed
        if job.job_id in self.orphans:
            return self._resume(job)
        if len(self.live) >= self.max_queued:
            raise OverflowError(f"{len(self.live)} requests in flight, the limit is {self.max_queued}")
        if job.job_id in self.live:
            if self.live[job.job_id].closed:
                raise StreamClosing(f"request id {job.job_id!r} is being cancelled")
            raise KeyError(f"request id {job.job_id!r} is already in flight")
        stream = JobStream(job)
        self.live[job.job_id] = stream
        self.inbox.post(Submit(job))
        return stream

    def close(self, job_id: str) -> None:
        """The client of ``job_id`` is gone: its job is cancelled."""
        if job_id in self.live:
            self.live[job_id].closed = True
            self.inbox.post(Cancel(job_id))

    async def await_adoption(self, job_id: str) -> None:
        """Waits (within the grace after start) for a returning worker to bring ``job_id``."""
        deadline = self.started_s + self.adoption_grace_s
        while job_id not in self.orphans and job_id not in self.live:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._joined.clear()
            try:
                await asyncio.wait_for(self._joined.wait(), left)
            except TimeoutError:
                return

    def _resume(self, request: Job) -> JobStream:
        """The client of an adopted job is back: its stream continues after the tokens it has
        (``request.output_token_ids``), with what the job produced meanwhile."""
        job = self.orphans[request.job_id][0]
        seen = request.output_token_ids
        if job.output_token_ids[:len(seen)] != seen or job.prompt_token_ids != request.prompt_token_ids:
            raise KeyError(f"request id {job.job_id!r} is in flight with other tokens")
        del self.orphans[job.job_id]
        # A worker's hello carries token ids only: the text (the predictor's key) is the client's.
        job.prompt_text = job.prompt_text or request.prompt_text
        stream = JobStream(job)
        extra = job.output_token_ids[len(seen):]
        if extra or job.is_finished:
            stream.push(TokenEvent(job.job_id, list(extra), len(seen), job.finish_reason))
        if not job.is_finished:
            self.live[job.job_id] = stream
        else:  # it finished while its client was away: counted, and observed, now
            self._finished(job)
        logger.info("stream of adopted job %s resumed at token %d (%d new)", job.job_id, len(seen), len(extra))
        return stream

    # ----------------------------------------------------------------- the loop's side

    def is_wanted(self, job_id: str) -> bool:
        """A submitted job still has its client (else its stream is dropped here)."""
        stream = self.live.get(job_id)
        if stream is None or stream.closed:
            self.live.pop(job_id, None)
            return False
        return True

    def forget(self, job_id: str) -> None:
        """The job was cancelled: its stream is gone with its client."""
        self.live.pop(job_id, None)

    def adopt(self, jobs: list[Job], now_s: float) -> None:
        """Jobs a worker kept now run here; each waits ``orphan_wait_s`` for its client."""
        for job in jobs:
            self.orphans[job.job_id] = (job, now_s + self.orphan_wait_s)
        self._joined.set()

    def expire_orphans(self, now_s: float) -> list[Job]:
        """Adopted jobs whose clients did not come back in time (the loop cancels them)."""
        expired = []
        for job_id, (job, until) in list(self.orphans.items()):
            if now_s > until:
                del self.orphans[job_id]
                expired.append(job)
                logger.info("adopted job %s: no client resumed it within %g s", job_id, self.orphan_wait_s)
        return expired

    def deliver(self, events: list[TokenEvent], now_s: float) -> None:
        """A report's tokens (reported at ``now_s``), for the pump to hand to their streams; a
        finished job's stream leaves ``live`` now."""
        for event in events:
            stream = self.live.get(event.job_id)
            if stream is None:
                continue
            if event.finish_reason is not None:
                del self.live[event.job_id]
            self._ready.append((stream, event, now_s))
        if self._ready:
            self._has_ready.set()

    def fail(self, job_id: str, failure: JobFailed) -> None:
        stream = self.live.pop(job_id, None)
        if stream is not None:
            stream.push(failure)

    def fail_all(self, code: str, message: str) -> None:
        """The scheduler stops or failed: tokens already reported go out, every live stream
        fails (resumable) and no stream opens any more."""
        if self._pump_task is not None:
            self._pump_task.cancel()
        while self._ready:
            self._hand_over(*self._ready.popleft())
        self.closed = JobFailed(code, message, resumable=True)
        for stream in list(self.live.values()):
            stream.push(JobFailed(code, message, resumable=True))
        self.live.clear()

    # ----------------------------------------------------------------- the streams' task

    async def _pump(self) -> None:
        while True:
            await self._has_ready.wait()
            await self.inbox.caught_up.wait()
            for _ in range(min(WAKE_SLICE, len(self._ready))):
                self._hand_over(*self._ready.popleft())
            if not self._ready:
                self._has_ready.clear()
            await asyncio.sleep(0)  # the woken handlers run, and what came in is read

    def _hand_over(self, stream: JobStream, event: TokenEvent, now_s: float) -> None:
        stream.push(event)
        try:  # the accounting never stands between a client and its tokens
            self.metrics.record_tokens(stream.job, event.index, len(event.token_ids), now_s)
            if event.finish_reason is not None:
                self._finished(stream.job)
        except Exception:
            logger.exception("accounting of job %s failed", stream.job.job_id)

    def _finished(self, job: Job) -> None:
        self.metrics.record_finish(job)
        if self.on_finish is not None:
            self.on_finish(job)
