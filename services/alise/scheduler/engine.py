"""The scheduler's engine loop: the single task that mutates scheduling state.

gRPC handlers never touch the core. They post events (a new job, a cancel, a new length
estimate, a worker's hello, report or departure) to an inbox; one task applies them in order
and, after each batch of events, keeps every worker ``plans_ahead`` plans ahead: a worker
runs step k while the core plans step k + 1 from the report of step k - 1, so the GPU never
waits for a plan. Aborts go out at once, on the plans' stream, ahead of the plans the worker
holds. About once a second (``census_interval_s``) a plan asks each worker for the list of
its jobs, which the core checks against its own (``alise.core.census``): a job the worker
holds that the scheduler does not know is aborted on sight, and counted in status and metrics.

A report is checked whole before it is applied (``alise.core.reports``); a worker that sends
a bad one is disconnected and its jobs recompute elsewhere, no token repeated or lost. Any
other exception while scheduling is fatal: it is logged with its traceback, the engine stops,
``failure`` and ``suspects`` (the jobs involved, ``alise.scheduler.quarantine``) are set and
``on_failure`` called (the service records the suspects, turns NOT_SERVING and exits
non-zero), never a silent stall.

Tokens flow back to each request's stream through an unbounded per-request buffer (bounded by
the request's own output length), woken after the next plans are out; detokenizing and
writing to clients happen on the streams' own tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from alise.common.metrics import SchedulerMetrics
from alise.core.blocks import WorkerCapacity
from alise.core.census import Disagreements
from alise.core.commands import HeldJob, StepPlan, StepReport, TokenEvent
from alise.core.job import Job, JobStatus, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.reports import ReportError
from alise.core.scheduler import SchedulerCore
from alise.scheduler.quarantine import suspects

logger = logging.getLogger(__name__)


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
    """Where one worker's reports went on the scheduler (sums, seconds, since the last log).

    ``device_s`` is what the worker timed around its forward and sampling; ``apply_s`` the
    engine's applying of reports (and waking of streams), ``schedule_s`` its planning. With
    plans in flight ahead of the worker, neither is on the worker's critical path as long as
    both together stay under a step; the worker logs the time it waited for a plan."""

    reports: int = 0
    device_s: float = 0.0
    apply_s: float = 0.0
    schedule_s: float = 0.0
    plans: int = 0

    def summary(self) -> str:
        n = max(self.reports, 1)
        ms = lambda x: 1e3 * x / n  # noqa: E731
        return (f"{self.reports} reports, {self.plans} plans; per report: device {ms(self.device_s):.1f} ms, "
                f"applying {ms(self.apply_s):.2f} ms, planning {ms(self.schedule_s):.2f} ms")


@dataclass(frozen=True)
class AbortJobs:
    """For a worker's stream: abort these jobs at the next step boundary; a plan up to
    ``through_step_id`` that the worker has not run yet may admit one of them (it skips that)."""

    job_ids: list[str]
    through_step_id: int


@dataclass
class WorkerLink:
    """One connected worker's stream, as the engine sees it."""

    capacity: WorkerCapacity
    outbox: asyncio.Queue
    model: str = ""
    device: str = ""
    connected_at_s: float = field(default_factory=time.monotonic)
    welcomed: bool = False            # its answer to the welcome (step 0) has come back
    last_step_s: float = 0.0
    num_steps: int = 0
    times: CycleTimes = field(default_factory=CycleTimes)
    latency_profile: LatencyModel | None = None  # what the worker measured on its device
    held: list[HeldJob] = field(default_factory=list)  # jobs it kept while it had no scheduler
    held_from: str = ""  # the scheduler_id they ran under
    last_census_s: float = 0.0

    @property
    def worker_id(self) -> str:
        return self.capacity.worker_id


class SchedulerEngine:
    def __init__(self, core: SchedulerCore, latency: LatencyModel, *,
                 max_queued: int = 4096, max_wait_no_worker_s: float = 30.0,
                 plans_ahead: int = 2, orphan_wait_s: float = 60.0, adoption_grace_s: float = 10.0,
                 census_interval_s: float = 1.0, on_finish=None, on_failure=None,
                 metrics: SchedulerMetrics | None = None) -> None:
        if plans_ahead < 1:
            raise ValueError(f"plans_ahead must be >= 1, got {plans_ahead}")
        self.core = core
        self.latency = latency
        self.max_queued = max_queued
        self.max_wait_no_worker_s = max_wait_no_worker_s
        self.plans_ahead = plans_ahead
        #: Every this many seconds a plan asks each worker for its jobs (0: every plan).
        self.census_interval_s = census_interval_s
        #: Random at start: a worker that lost its stream to this very scheduler says so.
        self.scheduler_id = os.urandom(8).hex()
        self.on_finish = on_finish
        self.on_failure = on_failure
        self.metrics = metrics or SchedulerMetrics()
        self.metrics.watch(self._state_metrics)
        self.streams: dict[str, JobStream] = {}
        self.links: dict[str, WorkerLink] = {}
        #: Jobs adopted from a worker's hello whose client has not resumed its stream yet:
        #: job id -> (job, until when it waits for its client). They run meanwhile.
        self.orphans: dict[str, tuple[Job, float]] = {}
        self.orphan_wait_s = orphan_wait_s
        #: For this long after start, a stream resumed for an unknown job waits for a worker to
        #: bring the job back (its hello) before it is recomputed from the client's tokens.
        self.adoption_grace_s = adoption_grace_s
        self._joined = asyncio.Event()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.started_s = time.monotonic()
        self.failure: BaseException | None = None
        #: The jobs involved in the failure (see ``alise.scheduler.quarantine.suspects``).
        self.suspects: list[Job] = []
        #: What the loop is doing: (event kind, payload), or ("dispatch", worker id).
        self._handling: tuple = ()
        self._task: asyncio.Task | None = None
        self._stopping = False
        #: Token events of the reports being handled, pushed to their streams after dispatch.
        self._deferred: list[tuple[JobStream, TokenEvent]] = []
        #: When the queue last had no worker to run it (the no-worker clock starts there).
        self._unserved_since_s: float | None = None
        #: Every this many seconds, log each worker's report times (and start them over).
        self.log_cycle_times_s = 30.0
        self._times_logged_s = time.monotonic()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler-engine")

    async def stop(self) -> None:
        # A stop event rather than task.cancel(): in Python 3.11 a cancel that lands while
        # wait_for's inner get() completes is swallowed, and the loop would run on.
        if self._task is not None and not self._task.done():
            self.inbox.put_nowait(("stop", None))
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5.0)
            except TimeoutError:
                self._task.cancel()
        self._fail_streams("UNAVAILABLE", "the scheduler is shutting down")

    def _fail_streams(self, code: str, message: str) -> None:
        for stream in list(self.streams.values()):
            stream.push(JobFailed(code, message, resumable=True))
        self.streams.clear()

    # ----------------------------------------------------------------- posting (handlers)

    def num_live_jobs(self) -> int:
        return len(self.streams)

    def submit(self, job: Job) -> JobStream:
        """Registers a job (or resumes the stream of the adopted job of that id); raises
        OverflowError when the queue is full, KeyError when the id is taken."""
        if self.failure is not None:
            raise RuntimeError("the scheduler's engine has failed")
        if job.job_id in self.orphans:
            return self._resume(job)
        if len(self.streams) >= self.max_queued:
            raise OverflowError(f"{len(self.streams)} requests in flight, the limit is {self.max_queued}")
        if job.job_id in self.streams:
            if self.streams[job.job_id].closed:
                raise StreamClosing(f"request id {job.job_id!r} is being cancelled")
            raise KeyError(f"request id {job.job_id!r} is already in flight")
        stream = JobStream(job)
        self.streams[job.job_id] = stream
        self.inbox.put_nowait(("submit", job))
        return stream

    async def await_adoption(self, job_id: str) -> None:
        """Waits (within the grace after start) for a returning worker to bring ``job_id``."""
        deadline = self.started_s + self.adoption_grace_s
        while job_id not in self.orphans and job_id not in self.streams:
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
            self.streams[job.job_id] = stream
        else:  # it finished while its client was away: counted, and observed, now
            self._record_finish(job)
            if self.on_finish is not None:
                self.on_finish(job)
        logger.info("stream of adopted job %s resumed at token %d (%d new)", job.job_id, len(seen), len(extra))
        return stream

    def cancel(self, job_id: str) -> None:
        if job_id in self.streams:
            self.streams[job_id].closed = True
            self.inbox.put_nowait(("cancel", job_id))

    def update_estimate(self, job_id: str, estimate: LengthEstimate) -> None:
        self.inbox.put_nowait(("estimate", (job_id, estimate)))

    def worker_joined(self, link: WorkerLink) -> None:
        self.inbox.put_nowait(("join", link))

    def worker_reported(self, worker_id: str, report: StepReport) -> None:
        self.inbox.put_nowait(("report", (worker_id, report)))

    def worker_left(self, worker_id: str) -> None:
        self.inbox.put_nowait(("leave", worker_id))

    # ----------------------------------------------------------------- the loop

    async def _run(self) -> None:
        try:
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
                    self._handling = (kind, payload)
                    getattr(self, f"_on_{kind}")(payload, now)
                self._handling = ()
                self._expire_unserved(now)
                if self.orphans:
                    self._expire_orphans(now)
                self._dispatch(time.monotonic())
                self._handling = ()
                # Streams wake only after the next plans are out: waking dozens of Generate
                # handlers first would queue the plans' writes behind all of theirs.
                self._flush_tokens()
                if now - self._times_logged_s >= self.log_cycle_times_s:
                    self._log_cycle_times(now)
        except Exception as exc:
            logger.exception("the scheduling loop failed; the scheduler stops serving")
            self.failure = exc
            self.suspects = suspects(exc, self._involved())
            self._fail_streams("UNAVAILABLE", "the scheduler failed and is restarting; retry")
            for link in self.links.values():
                link.outbox.put_nowait("the scheduler failed")
            if self.on_failure is not None:
                self.on_failure(exc)

    def _involved(self) -> list[Job]:
        """The jobs of the event or plan being handled."""
        jobs = self.core.jobs
        match self._handling:
            case ("submit", job):
                return [job]
            case ("cancel", job_id) | ("estimate", (job_id, _)):
                return [jobs[job_id]] if job_id in jobs else []
            case ("report", (_, report)):
                named = {out.job_id for out in report.outputs} | {r.job_id for r in report.refused}
                return [jobs[job_id] for job_id in sorted(named) if job_id in jobs]
            case ("dispatch", worker_id):  # its jobs and those it may take
                return [job for job in jobs.values() if job.worker_id in (worker_id, None)]
        return []

    def _flush_tokens(self) -> None:
        for stream, event in self._deferred:
            stream.push(event)
        self._deferred.clear()

    def _log_cycle_times(self, now: float) -> None:
        for link in self.links.values():
            if link.times.reports:
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

    def _on_estimate(self, payload: tuple[str, LengthEstimate], now: float) -> None:
        self.core.update_estimate(*payload)

    def _on_join(self, link: WorkerLink, now: float) -> None:
        self._adopt_profile(link)
        self.core.add_worker(link.capacity)
        self.links[link.worker_id] = link
        # A welcome: an empty plan whose report confirms the worker is executing plans.
        link.outbox.put_nowait(StepPlan(step_id=0))
        own = link.held_from == self.scheduler_id
        for job in self.core.adopt(link.worker_id, link.held, now, own=own):
            self.orphans[job.job_id] = (job, now + self.orphan_wait_s)
        self._joined.set()
        if link.held:
            logger.info("worker %s kept %d jobs%s: %d adopted, the rest aborted", link.worker_id, len(link.held),
                        " under this scheduler (re-queued here since)" if own else "",
                        sum(1 for h in link.held if h.job_id in self.orphans))
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

    def _on_leave(self, worker_id: str, now: float) -> None:
        link = self.links.pop(worker_id, None)
        if link is None:
            return
        moved = self.core.remove_worker(worker_id, now)
        logger.warning("worker %s left; %d jobs go back to the queue", worker_id, len(moved))

    def _on_report(self, payload: tuple[str, StepReport], now: float) -> None:
        worker_id, report = payload
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
        for event in events:
            stream = self.streams.get(event.job_id)
            if stream is None:
                continue
            self._deferred.append((stream, event))
            self.metrics.record_tokens(stream.job, len(event.token_ids), now)
            if event.finish_reason is not None:
                del self.streams[event.job_id]
                self._record_finish(stream.job)
                if self.on_finish is not None:
                    self.on_finish(stream.job)
        times = link.times
        times.reports += 1
        times.device_s += report.step_duration_s
        times.apply_s += time.monotonic() - started

    def _disconnect(self, link: WorkerLink, reason: str, now: float) -> None:
        """A worker that breaks the protocol is disconnected; its jobs recompute elsewhere."""
        logger.error("worker %s: %s; disconnecting it", link.worker_id, reason)
        link.outbox.put_nowait(f"protocol error: {reason}")
        self._on_leave(link.worker_id, now)

    def _record_finish(self, job: Job) -> None:
        self.metrics.record_finish(job)

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
        yield ("alise_worker_disagreements", "What censuses of a worker's jobs found since it connected: "
               "jobs it held unknown here (ghost, aborted), jobs counted here it did not hold (missing, "
               "recomputed), censuses with more device blocks in use than planned (block_deficit)",
               ["worker", "kind"],
               [([worker_id, kind], n) for worker_id, view in core.workers.items()
                for kind, n in (("ghost", view.disagreements.num_ghosts),
                                ("missing", view.disagreements.num_missing),
                                ("block_deficit", view.disagreements.num_block_deficits))])

    def _observe_latency(self, link: WorkerLink, report: StepReport) -> None:
        if report.step_duration_s <= 0 or not report.num_seqs:
            return
        self.metrics.step.labels(link.worker_id).observe(report.step_duration_s)
        link.last_step_s = report.step_duration_s
        link.num_steps += 1
        self.latency.observe_step(report.step_duration_s, report.num_seqs, report.num_context_tokens,
                                  [n for _, n in report.chunks], [s for s, _ in report.chunks])

    def _dispatch(self, now: float) -> None:
        """Aborts out at once, then every worker topped up to ``plans_ahead`` plans in flight
        (one of them a census when one is due)."""
        core = self.core
        for link in self.links.values():
            self._handling = ("dispatch", link.worker_id)
            aborts, through = core.take_aborts(link.worker_id)
            if aborts:
                link.outbox.put_nowait(AbortJobs(aborts, through))
            if not link.welcomed:
                continue
            started = time.monotonic()
            while core.num_in_flight(link.worker_id) < self.plans_ahead:
                census = now - link.last_census_s >= self.census_interval_s
                plan = core.schedule(link.worker_id, now, census=census)
                if plan.is_empty:
                    break
                if census:
                    link.last_census_s = now
                link.outbox.put_nowait(plan)
                link.times.plans += 1
            link.times.schedule_s += time.monotonic() - started

    def _expire_orphans(self, now: float) -> None:
        """Adopted jobs whose clients did not come back in time are cancelled."""
        for job_id, (job, until) in list(self.orphans.items()):
            if now > until:
                del self.orphans[job_id]
                if not job.is_finished:
                    self.core.cancel(job_id, now)
                logger.info("adopted job %s: no client resumed it within %g s", job_id, self.orphan_wait_s)

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
                connected_s=time.monotonic() - link.connected_at_s, **_disagreements(view)))
        return dict(
            policy=core.policy.name, workers=workers, num_waiting=len(core.waiting),
            num_running=core.num_with_status(JobStatus.RUNNING),
            num_paused=core.num_with_status(JobStatus.PAUSED),
            num_finished=core.num_finished, uptime_s=time.monotonic() - self.started_s,
            num_preemptions=sum(core.preemptions.values()),
            preemptions_by_action=dict(core.preemptions))


def _disagreements(view) -> dict[str, int]:
    """A worker's census totals, as status reports them."""
    d = view.disagreements if view is not None else Disagreements()
    return dict(num_censuses=d.num_censuses, num_ghost_jobs=d.num_ghosts, num_missing_jobs=d.num_missing,
                num_block_deficits=d.num_block_deficits)
