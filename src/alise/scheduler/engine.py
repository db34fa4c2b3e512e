"""The scheduler's engine loop: the single task that mutates scheduling state.

gRPC handlers never touch the core. They post typed events (``alise.scheduler.messages``)
to the inbox; this loop takes every event posted so far, applies them in order, and then
keeps every worker a few plans ahead (``alise.core.dispatch.keep_in_flight``): a worker runs
step k while the core plans step k + 1 from the report of step k - 1, so the GPU never waits
for a plan. How many: ``min_plans_ahead`` while the plans reach the worker in time, more (up
to ``plans_ahead``) once it is found waiting for one (``alise.core.dispatch.FlightDepth``).
Aborts go out at once, on the plans' stream, ahead of the plans the worker holds. About
once a second (``census_interval_s``) a plan asks each worker for the list of its jobs, which
the core checks against its own (``alise.core.census``): a job the worker holds that the
scheduler does not know is aborted on sight, and counted in status and metrics.

A report is checked whole before it is applied (``alise.core.reports``); a worker that sends
a bad one is disconnected and its jobs recompute elsewhere, no token repeated or lost. Any
other exception while scheduling is fatal: it is logged with its traceback, the engine stops,
``failure`` and ``suspects`` (the jobs involved, ``alise.scheduler.quarantine``) are set and
``on_failure`` called (the service records the suspects, turns NOT_SERVING and exits
non-zero), never a silent stall.

A report's tokens are handed to the client streams (``alise.scheduler.streams``), which do
the per-token work on their own task once this loop has sent its plans and caught up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from alise.common.metrics import SchedulerMetrics
from alise.core.commands import Shutdown, StepPlan, StepReport, Welcome
from alise.core.dispatch import FlightDepth, has_running, keep_in_flight
from alise.core.job import Job
from alise.core.latency_model import LatencyModel
from alise.core.reports import ReportError
from alise.core.scheduler import SchedulerCore
from alise.scheduler.messages import (
    Cancel,
    Event,
    Inbox,
    NewEstimate,
    Stop,
    Submit,
    WorkerJoined,
    WorkerLeft,
    WorkerReported,
)
from alise.scheduler.quarantine import suspects
from alise.scheduler.streams import JobFailed, Streams
from alise.scheduler.worker_link import WorkerLink

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatching:
    """What the loop is doing between events: planning for this worker."""

    worker_id: str


class SchedulerEngine:
    def __init__(self, core: SchedulerCore, latency: LatencyModel, inbox: Inbox, streams: Streams, *,
                 max_wait_no_worker_s: float, plans_ahead: int, min_plans_ahead: int | None = None,
                 census_interval_s: float = 1.0,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        # max_wait_no_worker_s, plans_ahead and min_plans_ahead (None: plans_ahead, a fixed
        # depth): the scheduler's config, checked there.
        self.core = core
        self.latency = latency
        self.inbox = inbox
        self.streams = streams
        self.max_wait_no_worker_s = max_wait_no_worker_s
        self.plans_ahead = plans_ahead
        self.min_plans_ahead = plans_ahead if min_plans_ahead is None else min_plans_ahead
        #: worker id -> the plans it keeps in flight now (kept while it is connected).
        self.depths: dict[str, FlightDepth] = {}
        #: Every this many seconds a plan asks each worker for its jobs (0: every plan).
        self.census_interval_s = census_interval_s
        #: Random at start: a worker that lost its stream to this very scheduler says so.
        self.scheduler_id = os.urandom(8).hex()
        self.on_failure = on_failure
        #: One registry for the scheduler: the streams' (their tokens), the loop's (its steps).
        self.metrics: SchedulerMetrics = streams.metrics
        self.links: dict[str, WorkerLink] = {}
        self.started_s = time.monotonic()
        self.failure: BaseException | None = None
        #: The jobs involved in the failure (see ``alise.scheduler.quarantine.suspects``).
        self.suspects: list[Job] = []
        #: What the loop is doing: the event it applies, or the worker it plans for.
        self._handling: Event | Dispatching | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        #: When the queue last had no worker to run it (the no-worker clock starts there).
        self._unserved_since_s: float | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler-engine")

    async def stop(self) -> None:
        # A stop event rather than task.cancel(): in Python 3.11 a cancel that lands while
        # wait_for's inner get() completes is swallowed, and the loop would run on.
        if self._task is not None and not self._task.done():
            self.inbox.post(Stop())
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5.0)
            except TimeoutError:
                self._task.cancel()
        self.streams.fail_all("UNAVAILABLE", "the scheduler is shutting down")

    # ----------------------------------------------------------------- the loop

    async def _run(self) -> None:
        try:
            while not self._stopping:
                batch = await self.inbox.next_batch(timeout_s=0.5)
                now = time.monotonic()
                for event in batch:
                    self._handling = event
                    self._apply(event, now)
                self._handling = None
                self._expire_unserved(now)
                if self.streams.orphans:
                    for job in self.streams.expire_orphans(now):
                        if not job.is_finished:
                            self.core.cancel(job.job_id, now)
                self._dispatch(time.monotonic())
                self._handling = None
                # The plans are out: the streams may now wake their clients' handlers.
                self.inbox.settle()
        except Exception as exc:
            logger.exception("the scheduling loop failed; the scheduler stops serving")
            self.failure = exc
            self.suspects = suspects(exc, self._involved())
            self.streams.fail_all("UNAVAILABLE", "the scheduler failed and is restarting; retry")
            for link in self.links.values():
                link.outbox.put_nowait(Shutdown("the scheduler failed"))
            if self.on_failure is not None:
                self.on_failure(exc)

    def _apply(self, event: Event, now: float) -> None:
        match event:
            case Submit(job):
                if self.streams.is_wanted(job.job_id):
                    self.core.submit(job)
            case Cancel(job_id):
                self.core.cancel(job_id, now)
                self.streams.forget(job_id)
            case NewEstimate(job_id, estimate):
                self.core.update_estimate(job_id, estimate)
            case WorkerJoined(link):
                self._join(link, now)
            case WorkerReported(worker_id, report):
                self._report(worker_id, report, now)
            case WorkerLeft(worker_id):
                self._leave(worker_id, now)
            case Stop():
                self._stopping = True

    def _involved(self) -> list[Job]:
        """The jobs of the event or plan being handled."""
        jobs = self.core.jobs
        match self._handling:
            case Submit(job):
                return [job]
            case Cancel(job_id) | NewEstimate(job_id, _):
                return [jobs[job_id]] if job_id in jobs else []
            case WorkerReported(_, report):
                named = {out.job_id for out in report.outputs} | {r.job_id for r in report.refused}
                return [jobs[job_id] for job_id in sorted(named) if job_id in jobs]
            case Dispatching(worker_id):  # its jobs and those it may take
                return [job for job in jobs.values() if job.worker_id in (worker_id, None)]
        return []

    # ----------------------------------------------------------------- workers

    def _join(self, link: WorkerLink, now: float) -> None:
        self._adopt_profile(link)
        self.core.add_worker(link.capacity)
        self.links[link.worker_id] = link
        self.depths[link.worker_id] = FlightDepth(self.min_plans_ahead, self.plans_ahead)
        link.outbox.put_nowait(Welcome(self.scheduler_id))
        own = link.held_from == self.scheduler_id
        adopted = self.core.adopt(link.worker_id, link.held, now, own=own)
        self.streams.adopt(adopted, now)
        if link.held:
            logger.info("worker %s kept %d jobs%s: %d adopted, the rest aborted", link.worker_id, len(link.held),
                        " under this scheduler (re-queued here since)" if own else "", len(adopted))
        logger.info("worker %s joined: %d device blocks of %d tokens, model %s on %s",
                    link.worker_id, link.capacity.num_device_blocks, link.capacity.block_size,
                    link.model, link.device)

    def _adopt_profile(self, link: WorkerLink) -> None:
        """The scheduler started without a latency profile takes the first worker's, in place
        (the policy and the memory planner hold this object); later ones are only compared."""
        profile = link.latency_profile
        if profile is None:
            return
        if not self.latency.measured:
            for name in (*LatencyModel.FITTED, "name", "meta"):
                setattr(self.latency, name, getattr(profile, name))
            self.latency.correction = 1.0
            self.core.latency_changed()
            logger.info("latency model: worker %s's profile %r (c0 %.2f ms, %.1f us a prefill token)",
                        link.worker_id, profile.name, 1e3 * profile.c0_s, 1e6 * profile.c_pre_s)
        elif profile.name != self.latency.name:
            logger.warning("worker %s measured profile %r; the scheduler keeps %r", link.worker_id,
                           profile.name, self.latency.name)

    def _leave(self, worker_id: str, now: float) -> None:
        link = self.links.pop(worker_id, None)
        self.depths.pop(worker_id, None)
        if link is None:
            return
        moved = self.core.remove_worker(worker_id, now)
        logger.warning("worker %s left; %d jobs go back to the queue", worker_id, len(moved))

    def _report(self, worker_id: str, report: StepReport, now: float) -> None:
        link = self.links.get(worker_id)
        if link is None:
            return
        started = time.monotonic()
        if not link.welcomed:
            if report.step_id != 0 or report.outputs:
                self._disconnect(link, f"answered the welcome with step {report.step_id}", now)
            link.welcomed = True
            return
        try:
            events = self.core.apply_report(worker_id, report, now)
        except ReportError as exc:
            self._disconnect(link, str(exc), now)
            return
        self._observe_latency(link, report)
        self.streams.deliver(events, now)
        times = link.times
        times.reports += 1
        times.device_s += report.step_duration_s
        times.apply_s += time.monotonic() - started

    def _disconnect(self, link: WorkerLink, reason: str, now: float) -> None:
        """A worker that breaks the protocol is disconnected; its jobs recompute elsewhere."""
        logger.error("worker %s: %s; disconnecting it", link.worker_id, reason)
        link.outbox.put_nowait(Shutdown(f"protocol error: {reason}"))
        self._leave(link.worker_id, now)

    def _observe_latency(self, link: WorkerLink, report: StepReport) -> None:
        if report.step_duration_s <= 0 or not report.num_seqs:
            return
        self.metrics.record_step(link.worker_id, report)
        link.last_step_s = report.step_duration_s
        link.num_steps += 1
        self.latency.observe_step(report.step_duration_s, report.num_seqs, report.num_context_tokens,
                                  [n for _, n in report.chunks], [s for s, _ in report.chunks])

    # ----------------------------------------------------------------- plans

    def _dispatch(self, now: float) -> None:
        """Every worker's aborts out at once, then its plans topped up to its depth in flight
        (the first a census when one is due); a worker not welcomed yet gets aborts only."""
        for link in self.links.values():
            self._handling = Dispatching(link.worker_id)
            started = time.monotonic()
            census = now - link.last_census_s >= self.census_interval_s
            depth = self.depths[link.worker_id]
            before = depth.depth
            if link.welcomed:
                depth.dispatching(now, self.core.num_in_flight(link.worker_id),
                                  has_running(self.core, link.worker_id), link.last_step_s)
            messages = keep_in_flight(self.core, link.worker_id, now, census=census,
                                      plans_ahead=depth.depth if link.welcomed else 0)
            depth.sent(now, sum(isinstance(m, StepPlan) for m in messages), self.core.num_in_flight(link.worker_id))
            if depth.depth != before:
                logger.info("worker %s %s: %d plans in flight from now", link.worker_id,
                            "waited for a plan" if depth.depth > before else "had its plans in time", depth.depth)
            for message in messages:
                link.outbox.put_nowait(message)
                if isinstance(message, StepPlan):
                    link.times.plans += 1
                    if message.census:
                        link.last_census_s = now
            link.times.schedule_s += time.monotonic() - started

    def _expire_unserved(self, now: float) -> None:
        """Fails the waiting jobs once no worker has been connected for the wait bound,
        counted from when the last worker left (or the first job came with none)."""
        if self.links or not self.core.waiting:
            self._unserved_since_s = None
            return
        if self._unserved_since_s is None:
            self._unserved_since_s = now
        if now - self._unserved_since_s <= self.max_wait_no_worker_s:
            return
        for job in list(self.core.waiting.values()):
            if now - max(job.arrival_s, self._unserved_since_s) > self.max_wait_no_worker_s:
                self.core.cancel(job.job_id, now)
                self.streams.fail(job.job_id, JobFailed(
                    "UNAVAILABLE", f"no worker connected within {self.max_wait_no_worker_s:g} s"))
