"""The scheduler's engine loop: the single task that mutates scheduling state.

gRPC handlers never touch the core. They post events (a new job, a cancel, a worker's
hello, report or departure) to a bounded inbox; one task applies them in order and, after
each batch of events, hands every idle worker its next step plan. Tokens flow back to
each request's stream through an unbounded per-request buffer (its size is bounded by
the request's own output length).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from alise.common.metrics import SchedulerMetrics
from alise.core.blocks import WorkerCapacity
from alise.core.commands import StepPlan, StepReport, TokenEvent
from alise.core.job import Job, JobStatus
from alise.core.latency_model import LatencyModel
from alise.core.scheduler import SchedulerCore

logger = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job ended without finishing (no worker in time, scheduler shutting down)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class JobStream:
    """Where a job's tokens wait for its Generate handler."""

    job: Job
    events: deque = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
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


@dataclass
class CycleTimes:
    """Where one worker's plan/report cycles went (sums, seconds), as the scheduler sees them.

    A cycle: the plan is handed to the worker's stream, the worker runs it and reports, the
    scheduler takes the report in and hands over the next plan. ``device_s`` is what the worker
    timed around its forward and sampling; ``round_trip_s - device_s`` is the worker's host
    work and the transport both ways; ``turnaround_s`` is the scheduler's share (of which
    ``apply_s`` applying reports and fanning tokens out, ``schedule_s`` planning)."""

    cycles: int = 0
    device_s: float = 0.0
    round_trip_s: float = 0.0
    turnaround_s: float = 0.0
    apply_s: float = 0.0
    schedule_s: float = 0.0

    def summary(self) -> str:
        n = max(self.cycles, 1)
        ms = lambda x: 1e3 * x / n  # noqa: E731
        return (f"{self.cycles} cycles; per cycle {ms(self.round_trip_s + self.turnaround_s):.1f} ms: "
                f"device {ms(self.device_s):.1f}, worker host + transport "
                f"{ms(self.round_trip_s - self.device_s):.1f}, scheduler {ms(self.turnaround_s):.1f} "
                f"(reports {ms(self.apply_s):.1f}, planning {ms(self.schedule_s):.1f})")


@dataclass
class WorkerLink:
    """One connected worker's stream, as the engine sees it."""

    capacity: WorkerCapacity
    outbox: asyncio.Queue
    model: str = ""
    device: str = ""
    connected_at_s: float = field(default_factory=time.monotonic)
    idle: bool = True                 # its last report has been answered?
    plan: StepPlan | None = None      # the plan it is executing
    last_step_s: float = 0.0
    num_steps: int = 0
    times: CycleTimes = field(default_factory=CycleTimes)
    latency_profile: LatencyModel | None = None  # what the worker measured on its device
    plan_sent_s: float | None = None   # when its current plan was handed to the stream
    report_at_s: float | None = None   # when its last report arrived (not yet answered)

    @property
    def worker_id(self) -> str:
        return self.capacity.worker_id


class SchedulerEngine:
    def __init__(self, core: SchedulerCore, latency: LatencyModel, *,
                 max_queued: int = 4096, max_wait_no_worker_s: float = 30.0,
                 on_finish=None, metrics: SchedulerMetrics | None = None) -> None:
        self.core = core
        self.latency = latency
        self.max_queued = max_queued
        self.max_wait_no_worker_s = max_wait_no_worker_s
        self.on_finish = on_finish
        self.metrics = metrics or SchedulerMetrics()
        self.metrics.watch(self._state_metrics)
        self.streams: dict[str, JobStream] = {}
        self.links: dict[str, WorkerLink] = {}
        self.inbox: asyncio.Queue = asyncio.Queue(maxsize=100_000)
        self.started_s = time.monotonic()
        self._task: asyncio.Task | None = None
        self._stopping = False
        #: Token events of the reports being handled, pushed to their streams after dispatch
        #: (``tokens_after_plans``; False pushes each as its report is applied).
        self._deferred: list[tuple[JobStream, TokenEvent]] = []
        self.tokens_after_plans = True
        #: Every this many seconds, log each worker's cycle times (and start them over).
        self.log_cycle_times_s = 30.0
        self._times_logged_s = time.monotonic()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler-engine")

    async def stop(self) -> None:
        # A stop event rather than task.cancel(): in Python 3.11 a cancel that lands while
        # wait_for's inner get() completes is swallowed, and the loop would run on.
        if self._task is not None:
            self.inbox.put_nowait(("stop", None))
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5.0)
            except TimeoutError:
                self._task.cancel()
        for stream in list(self.streams.values()):
            stream.push(JobFailed("UNAVAILABLE", "the scheduler is shutting down"))

    # ----------------------------------------------------------------- posting (handlers)

    def num_live_jobs(self) -> int:
        return len(self.streams)

    def submit(self, job: Job) -> JobStream:
        """Registers a job; raises OverflowError when the queue is full."""
        if len(self.streams) >= self.max_queued:
            raise OverflowError(f"{len(self.streams)} requests in flight, the limit is {self.max_queued}")
        if job.job_id in self.streams:
            raise KeyError(f"request id {job.job_id!r} is already in flight")
        stream = JobStream(job)
        self.streams[job.job_id] = stream
        self.inbox.put_nowait(("submit", job))
        return stream

    def cancel(self, job_id: str) -> None:
        if job_id in self.streams:
            self.streams[job_id].closed = True
            self.inbox.put_nowait(("cancel", job_id))

    def worker_joined(self, link: WorkerLink) -> None:
        self.inbox.put_nowait(("join", link))

    def worker_reported(self, worker_id: str, report: StepReport) -> None:
        self.inbox.put_nowait(("report", (worker_id, report, time.monotonic())))

    def worker_left(self, worker_id: str) -> None:
        self.inbox.put_nowait(("leave", worker_id))

    # ----------------------------------------------------------------- the loop

    async def _run(self) -> None:
        while not self._stopping:
            try:
                event = await asyncio.wait_for(self.inbox.get(), timeout=0.5)
            except TimeoutError:
                event = None
            batch = [event] if event is not None else []
            while not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            now = time.monotonic()
            for kind, payload in batch:
                try:
                    getattr(self, f"_on_{kind}")(payload, now)
                except Exception:
                    logger.exception("engine failed to handle %s", kind)
            self._expire_unserved(now)
            self._dispatch(time.monotonic())
            # Tokens reach their streams only after the next plans are out: waking dozens of
            # Generate handlers first would queue the plan's write behind all their writes.
            self._flush_tokens()
            if now - self._times_logged_s >= self.log_cycle_times_s:
                self._log_cycle_times(now)

    def _flush_tokens(self) -> None:
        for stream, event in self._deferred:
            stream.push(event)
        self._deferred.clear()

    def _log_cycle_times(self, now: float) -> None:
        for link in self.links.values():
            if link.times.cycles:
                logger.info("worker %s, last %.0f s: %s", link.worker_id,
                            now - self._times_logged_s, link.times.summary())
            link.times = CycleTimes()
        self._times_logged_s = now

    def _on_stop(self, _payload, now: float) -> None:
        self._stopping = True

    def _on_submit(self, job: Job, now: float) -> None:
        if self.streams.get(job.job_id) is None or self.streams[job.job_id].closed:
            self.streams.pop(job.job_id, None)
            return
        self.core.submit(job)

    def _on_cancel(self, job_id: str, now: float) -> None:
        self.core.cancel(job_id, now)
        self.streams.pop(job_id, None)

    def _on_join(self, link: WorkerLink, now: float) -> None:
        self._adopt_profile(link)
        self.core.add_worker(link.capacity)
        self.links[link.worker_id] = link
        # A welcome: an empty plan whose report confirms the worker is executing plans.
        link.idle = False
        link.plan = StepPlan(step_id=0)
        link.outbox.put_nowait(link.plan)
        logger.info("worker %s joined: %d device blocks of %d tokens, model %s on %s",
                    link.worker_id, link.capacity.num_device_blocks, link.capacity.block_size,
                    link.model, link.device)

    def _adopt_profile(self, link: WorkerLink) -> None:
        """The scheduler started without a latency profile takes the first worker's, in place
        (the policy and the memory planner hold this object); later ones are only compared."""
        profile = link.latency_profile
        if profile is None:
            return
        if self.latency.name == "default":
            for name in (*LatencyModel.FITTED, "name", "meta"):
                setattr(self.latency, name, getattr(profile, name))
            self.latency.correction = 1.0
            self.core.latency_changed()
            logger.info("latency model: worker %s's profile %r (c0 %.2f ms, %.1f us a prefill token)",
                        link.worker_id, profile.name, 1e3 * profile.c0_s, 1e6 * profile.c_pre_s)
        elif profile.name != self.latency.name:
            logger.warning("worker %s measured profile %r; the scheduler keeps %r", link.worker_id,
                           profile.name, self.latency.name)

    def _on_leave(self, worker_id: str, now: float) -> None:
        link = self.links.pop(worker_id, None)
        if link is None:
            return
        moved = self.core.remove_worker(worker_id, now)
        logger.warning("worker %s left; %d jobs go back to the queue", worker_id, len(moved))

    def _on_report(self, payload: tuple[str, StepReport, float], now: float) -> None:
        worker_id, report, received_s = payload
        link = self.links.get(worker_id)
        if link is None:
            return
        started = time.monotonic()
        try:
            if link.plan is None or report.step_id != link.plan.step_id:
                raise ValueError(f"reported step {report.step_id}, expected "
                                 f"{link.plan.step_id if link.plan else 'no report'}")
            self._observe_latency(link, report)
            events = self.core.apply_report(worker_id, report, now)
        except ValueError as exc:
            # A worker that breaks the protocol is disconnected; its jobs recompute elsewhere.
            logger.error("worker %s: %s; disconnecting it", worker_id, exc)
            link.outbox.put_nowait(f"protocol error: {exc}")
            self._on_leave(worker_id, now)
            return
        link.idle = True
        link.plan = None
        for event in events:
            stream = self.streams.get(event.job_id)
            if stream is None:
                continue
            self._deferred.append((stream, event))
            if not self.tokens_after_plans:
                self._flush_tokens()
            self.metrics.tokens.inc(len(event.token_ids))
            if event.finish_reason is not None:
                del self.streams[event.job_id]
                self._record_finish(stream.job)
                if self.on_finish is not None:
                    self.on_finish(stream.job)
        times = link.times
        if link.plan_sent_s is not None:
            times.round_trip_s += received_s - link.plan_sent_s
            times.device_s += report.step_duration_s
            times.apply_s += time.monotonic() - started
            link.report_at_s = received_s

    def _record_finish(self, job: Job) -> None:
        m = self.metrics
        m.requests.labels("finished").inc()
        if job.first_token_s is None or job.finish_s is None:
            return
        m.ttft.observe(job.first_token_s - job.arrival_s)
        m.e2e.observe(job.finish_s - job.arrival_s)
        if job.num_output_tokens > 1:
            m.tpot.observe((job.finish_s - job.first_token_s) / (job.num_output_tokens - 1))
        if job.estimate is not None:
            m.prediction_error.observe(abs(job.estimate.mean - job.num_output_tokens))

    def _state_metrics(self):
        core = self.core
        yield ("alise_queue_waiting", "Jobs waiting for a worker", [], [([], len(core.waiting))])
        yield ("alise_jobs", "Jobs on workers by state", ["state"],
               [(["running"], core.num_with_status(JobStatus.RUNNING)),
                (["paused"], core.num_with_status(JobStatus.PAUSED))])
        yield ("alise_preemptions", "Preemptions by KV action since start", ["action"],
               [([action], n) for action, n in core.preemptions.items()])
        yield ("alise_workers", "Connected workers", [], [([], len(self.links))])
        blocks = []
        for worker_id, view in core.workers.items():
            cap = view.capacity
            blocks += [([worker_id, "device", "free"], view.num_free_device_blocks),
                       ([worker_id, "device", "used"], cap.num_device_blocks - view.num_free_device_blocks),
                       ([worker_id, "host", "free"], view.num_free_host_blocks),
                       ([worker_id, "host", "used"], cap.num_host_blocks - view.num_free_host_blocks)]
        yield ("alise_kv_blocks", "KV blocks per worker", ["worker", "where", "state"], blocks)

    def _observe_latency(self, link: WorkerLink, report: StepReport) -> None:
        if report.step_duration_s <= 0 or link.plan is None or not link.plan.step_jobs:
            return
        self.metrics.step.labels(link.worker_id).observe(report.step_duration_s)
        link.last_step_s = report.step_duration_s
        link.num_steps += 1
        jobs = [self.core.jobs.get(job_id) for job_id in link.plan.step_jobs]
        context = sum(job.num_tokens for job in jobs if job is not None)
        prefill = [n for n in link.plan.step_jobs.values() if n > 1]
        self.latency.observe_step(report.step_duration_s, len(link.plan.step_jobs), context, prefill)

    def _dispatch(self, now: float) -> None:
        for link in self.links.values():
            if not link.idle:
                continue
            started = time.monotonic()
            plan = self.core.schedule(link.worker_id, now)
            if plan.is_empty:
                continue
            link.idle = False
            link.plan = plan
            link.outbox.put_nowait(plan)
            sent = time.monotonic()
            if link.report_at_s is not None:
                link.times.cycles += 1
                link.times.turnaround_s += sent - link.report_at_s
                link.times.schedule_s += sent - started
            link.plan_sent_s, link.report_at_s = sent, None

    def _expire_unserved(self, now: float) -> None:
        if self.links or not self.core.waiting:
            return
        for job in list(self.core.waiting.values()):
            if now - job.arrival_s > self.max_wait_no_worker_s:
                self.core.cancel(job.job_id, now)
                stream = self.streams.pop(job.job_id, None)
                if stream is not None:
                    stream.push(JobFailed(
                        "UNAVAILABLE",
                        f"no worker connected within {self.max_wait_no_worker_s:g} s"))

    # ----------------------------------------------------------------- introspection

    def snapshot(self) -> dict:
        core = self.core
        workers = []
        for link in self.links.values():
            view = core.workers.get(link.worker_id)
            cap = link.capacity
            workers.append(dict(
                worker_id=link.worker_id, model=link.model, device=link.device,
                block_size=cap.block_size, num_device_blocks=cap.num_device_blocks,
                num_free_device_blocks=view.num_free_device_blocks if view else 0,
                num_host_blocks=cap.num_host_blocks,
                num_free_host_blocks=view.num_free_host_blocks if view else 0,
                num_running=view.num_with_status(JobStatus.RUNNING) if view else 0,
                num_paused=view.num_with_status(JobStatus.PAUSED) if view else 0,
                last_step_ms=link.last_step_s * 1e3, num_steps=link.num_steps,
                connected_s=time.monotonic() - link.connected_at_s))
        return dict(
            policy=core.policy.name, workers=workers, num_waiting=len(core.waiting),
            num_running=core.num_with_status(JobStatus.RUNNING),
            num_paused=core.num_with_status(JobStatus.PAUSED),
            num_finished=core.num_finished, uptime_s=time.monotonic() - self.started_s,
            num_preemptions=sum(core.preemptions.values()),
            preemptions_by_action=dict(core.preemptions))

