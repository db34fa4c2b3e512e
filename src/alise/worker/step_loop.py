"""The worker's step thread: plans run in order, aborts applied ahead of them.

The event loop reads the scheduler's stream and hands each plan (``submit``) and each
``AbortJobs`` (``abort``) to this thread, which runs the plans one after another, each as soon
as the step before it is done. Aborts wait in a queue of their own and are all applied at the
next step boundary, before the next plan, however many plans are queued: a cancelled job
costs no step beyond the one running. An idle thread is woken to apply them at once.

Overlapped (``overlap``, ``alise worker --async-steps``): when the next plan is already queued
as a step is launched, the thread launches that plan's step too (``WorkerEngine.launch``, its
decodes' ids taken on the device) before it waits for the first step's tokens and sends its
report, so the device runs one step while the host reports the last and prepares the next.
With no plan queued it waits for one while the step in flight still runs on the device (the
scheduler plans the next step on the report just sent, well within a step), and finishes
that step first (no overlap there) once the device is done with it and no plan came, before
aborts, at the end, and where ``WorkerEngine.can_overlap`` says no: aborts and KV actions then
meet the jobs exactly as the synchronous loop would.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from alise.core.commands import AbortJobs, StepPlan, StepReport
from alise.worker.engine import LaunchedStep, WorkerEngine

logger = logging.getLogger(__name__)

#: How often a thread with a step on the device and no plan queued looks at the device.
POLL_S = 2e-4


@dataclass(frozen=True)
class WakeUp:
    """Aborts are waiting: apply them now, not at the next plan."""


@dataclass(frozen=True)
class Close:
    """The session is over: the thread ends after its current step."""


class StepHost(Protocol):
    """What the step thread runs plans on (the worker service)."""

    engine: WorkerEngine

    def execute(self, plan: StepPlan, waited_s: float | None) -> StepReport:
        """Runs one plan on the engine; ``waited_s``: how long it waited with jobs running."""

    def count_cycle(self, wait_s: float, execute_s: float, report: StepReport) -> None:
        """Where one cycle's time went: waiting for the plan, executing it."""

    def record(self, report: StepReport, waited_s: float | None) -> StepReport:
        """An overlapped step's report, once its tokens are read, into metrics and logs."""

    def step_failed(self) -> None:
        """A step raised (its jobs may be half-advanced)."""


@dataclass(frozen=True)
class _InFlight:
    """A launched step: when, how long the thread waited for its plan, and that wait as
    ``StepHost.execute``'s ``waited_s`` (None: no job was running)."""

    step: LaunchedStep
    started_s: float
    wait_s: float
    waited_s: float | None


class StepLoop:
    """The step thread of one session: runs plans in order, each as soon as the step before
    it is done; aborts received meanwhile are applied first, at the step boundary.

    Reports go back to the event loop (``reports``); a step that raises (CUDA out of memory,
    a kernel error) sets ``failed``: its sequences may be half-advanced, so the session ends,
    every job goes back to the scheduler and the worker reconnects with a clean engine."""

    def __init__(self, worker: StepHost, loop: asyncio.AbstractEventLoop, *, overlap: bool = False) -> None:
        self.worker = worker
        can = getattr(worker.engine.executor, "can_overlap", False)
        if overlap and not can:
            # On by default, so a note: the transformers runner and tensor-parallel ranks
            # (tokens broadcast from the host) cannot take their input ids on the device.
            logger.info("overlapped steps need the paged runner on one device; steps run one after another")
        self.overlap = overlap and can
        self.loop = loop
        self.reports: asyncio.Queue = asyncio.Queue()
        self.failed = asyncio.Event()
        self._plans: queue.SimpleQueue[StepPlan | WakeUp | Close] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[AbortJobs] = queue.SimpleQueue()
        run = self._run_overlapped if self.overlap else self._run
        self._thread = threading.Thread(target=run, name="worker-steps", daemon=True)
        self._thread.start()

    def submit(self, plan: StepPlan) -> None:
        self._plans.put(plan)

    def abort(self, aborts: AbortJobs) -> None:
        self._aborts.put(aborts)
        self._plans.put(WakeUp())  # an idle thread frees the jobs now, not at its next plan

    async def close(self) -> None:
        """Stops the thread after its current step (the worker then keeps or drops the jobs)."""
        self._plans.put(Close())
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        engine = self.worker.engine
        done_s = time.monotonic()
        busy = False  # the last step left jobs running: a wait for the next plan idles the device
        while True:
            item = self._plans.get()
            while not self._aborts.empty():
                aborts = self._aborts.get()
                engine.abort(aborts.job_ids, aborts.through_step_id)
            match item:
                case Close():
                    return
                case WakeUp():
                    continue  # the aborts above were all it came for
                case StepPlan() as plan:
                    started = time.monotonic()
                    report = self._execute(plan, started - done_s if busy else None)
                    if report is None:
                        return
                    now = time.monotonic()
                    self.worker.count_cycle(started - done_s, now - started, report)
                    done_s = now
                    busy = report.step_duration_s > 0 and engine.num_running > 0

    def _run_overlapped(self) -> None:
        """``_run`` with each step launched, when its successor is queued, before its tokens
        are read (the module doc)."""
        engine = self.worker.engine
        self._done_s, self._busy = time.monotonic(), False
        flight: _InFlight | None = None
        while True:
            item = self._take(block=True) if flight is None else self._next(flight)
            aborts = self._drain_aborts()
            if flight is not None and (item is None or aborts or not isinstance(item, StepPlan)
                                       or not engine.can_overlap(flight.step, item)):
                if not self._finish(flight):
                    return
                flight = None
            for abort in aborts:
                engine.abort(abort.job_ids, abort.through_step_id)
            match item:
                case Close():
                    return
                case StepPlan() as plan:
                    started = time.monotonic()
                    # A step launched behind another waited for nothing; one launched after a
                    # wait for its plan waited that long (with jobs running: the device idled).
                    wait_s = 0.0 if flight else max(0.0, started - self._done_s)
                    waited_s = wait_s if self._busy and flight is None else None
                    step = self._guard(plan.step_id, engine.launch, plan, flight.step if flight else None)
                    if step is None or (flight is not None and not self._finish(flight)):
                        return
                    flight = _InFlight(step, started, wait_s, waited_s)
                case WakeUp():
                    pass  # the aborts above were all it came for

    def _take(self, *, block: bool) -> StepPlan | WakeUp | Close | None:
        """The next plan or signal; None when none is queued and ``block`` is off."""
        if block:
            return self._plans.get()
        try:
            return self._plans.get_nowait()
        except queue.Empty:
            return None

    def _next(self, flight: _InFlight) -> StepPlan | WakeUp | Close | None:
        """The next plan or signal, waited for while ``flight`` still runs on the device (one
        that comes meanwhile is launched behind it); None once the device is done with it and
        nothing came. Finishing it at once instead would leave the device idle from its end
        to the next launch whenever the next plan is a scheduler's round trip away."""
        while True:
            item = self._take(block=False)
            if item is not None or self.worker.engine.step_done(flight.step):
                return item
            try:
                return self._plans.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def _drain_aborts(self) -> list[AbortJobs]:
        aborts = []
        while not self._aborts.empty():
            aborts.append(self._aborts.get())
        return aborts

    def _finish(self, flight: _InFlight) -> bool:
        """Reads a launched step's tokens and sends its report; False when that raised."""
        report = self._guard(flight.step.plan.step_id, self.worker.engine.finish, flight.step)
        if report is None:
            return False
        report = self.worker.record(report, flight.waited_s)
        self.loop.call_soon_threadsafe(self.reports.put_nowait, report)
        self._done_s = time.monotonic()
        self._busy = report.step_duration_s > 0 and self.worker.engine.num_running > 0
        self.worker.count_cycle(flight.wait_s, self._done_s - flight.started_s, report)
        return True

    def _guard(self, step_id: int, call, *args):
        """``call(*args)``; None when it raised (the session ends, as in ``_execute``)."""
        try:
            return call(*args)
        except Exception:
            logger.exception("step %d failed; this worker's jobs go back to the scheduler and it reconnects",
                             step_id)
            self.worker.step_failed()
            self.loop.call_soon_threadsafe(self.failed.set)
            return None

    def _execute(self, plan: StepPlan, waited_s: float | None) -> StepReport | None:
        """Runs the plan and sends its report back; None when the step raised."""
        report = self._guard(plan.step_id, self.worker.execute, plan, waited_s)
        if report is not None:
            self.loop.call_soon_threadsafe(self.reports.put_nowait, report)
        return report
