"""The worker's step thread: plans run in order, aborts applied ahead of them.

The event loop reads the scheduler's stream and hands each plan (``submit``) and each
``AbortJobs`` (``abort``) to this thread, which runs the plans one after another, each as soon
as the step before it is done. Aborts wait in a queue of their own and are all applied at the
next step boundary, before the next plan, however many plans are queued: a cancelled job
costs no step beyond the one running. An idle thread is woken to apply them at once.
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
from alise.worker.engine import WorkerEngine

logger = logging.getLogger(__name__)


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

    def step_failed(self) -> None:
        """A step raised (its jobs may be half-advanced)."""


class StepLoop:
    """The step thread of one session: runs plans in order, each as soon as the step before
    it is done; aborts received meanwhile are applied first, at the step boundary.

    Reports go back to the event loop (``reports``); a step that raises (CUDA out of memory,
    a kernel error) sets ``failed``: its sequences may be half-advanced, so the session ends,
    every job goes back to the scheduler and the worker reconnects with a clean engine."""

    def __init__(self, worker: StepHost, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        self.reports: asyncio.Queue = asyncio.Queue()
        self.failed = asyncio.Event()
        self._plans: queue.SimpleQueue[StepPlan | WakeUp | Close] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[AbortJobs] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="worker-steps", daemon=True)
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

    def _execute(self, plan: StepPlan, waited_s: float | None) -> StepReport | None:
        """Runs the plan and sends its report back; None when the step raised."""
        try:
            report = self.worker.execute(plan, waited_s)
        except Exception:
            logger.exception("step %d failed; this worker's jobs go back to the scheduler and it "
                             "reconnects", plan.step_id)
            self.worker.step_failed()
            self.loop.call_soon_threadsafe(self.failed.set)
            return None
        self.loop.call_soon_threadsafe(self.reports.put_nowait, report)
        return report
