"""What goes down a worker's stream after a batch of events: aborts first, then plans ahead.

A worker runs step k while the core plans step k + 1 from the report of step k - 1, so the
device never waits for a plan: the core keeps a few plans in flight per worker (1:
lock-step). :func:`keep_in_flight` is that rule, written once; the scheduler's engine
sends what it returns on the worker's stream, the simulator hands it to its virtual worker,
and the tests drive the core with it.

How many (:class:`FlightDepth`): every plan in flight is a step a new job's prefill runs
behind, one step of its first token, so a worker keeps ``min_plans_ahead`` while the plans
reach it in time, and one more, up to ``plans_ahead``, each time it is found to have run
out of plans with jobs to run (it finished its last step and waited for the next plan). A
run of ``RELAX_AFTER_PLANS`` plans without a shortage takes a plan back.

Order matters: the aborts go first, at once (the worker applies them at its next step
boundary, ahead of the plans it holds: a cancelled job costs no step beyond the one running),
and name the last plan sent before them; every plan made after them is newer, so a job
aborted and re-admitted in the same round (a refusal re-queued onto the same worker) is
admitted again after its abort.
"""

from __future__ import annotations

from alise.core.commands import AbortJobs, StepPlan
from alise.core.job import JobStatus
from alise.core.scheduler import SchedulerCore

#: Plans sent in a row with none found drained before the depth steps down by one (about five
#: seconds of 10 ms steps: a scheduler that stalls now and then stays at the deeper setting).
RELAX_AFTER_PLANS = 500


class FlightDepth:
    """How many plans one worker keeps in flight: between ``least`` and ``most``
    (``SchedulingConfig.min_plans_ahead`` and ``plans_ahead``; ``least`` above ``most`` is
    read as ``most``), starting at ``least``.

    Before each dispatch to the worker, :meth:`dispatching` asks whether the worker ran out
    of plans since the last one, by either sign: none in flight while it holds running jobs
    (every report is in), or more time gone since the last dispatch than the plans left in
    flight then take at the last step's pace (a stalled scheduler reads the reports of the
    steps that ran meanwhile one loop turn at a time, so the first sign can come late)."""

    def __init__(self, least: int, most: int) -> None:
        self.least = min(least, most)
        self.most = most
        self.depth = self.least
        #: Plans sent since the worker last ran out (or since the last step down).
        self.num_on_time = 0
        #: Times the worker was found to have run out.
        self.num_drained = 0
        self._last_s: float | None = None
        self._left_in_flight = 0

    def dispatching(self, now_s: float, num_in_flight: int, has_running: bool, step_s: float) -> bool:
        """Whether the worker ran out of plans since the last dispatch; if so one more plan is
        kept in flight from this dispatch on."""
        # No step time yet (no report, or steps that ran nothing): the pace is unknown, and
        # no time gone is a sign.
        late = (self._last_s is not None and self._left_in_flight > 0 and step_s > 0
                and now_s - self._last_s > self._left_in_flight * step_s)
        if not has_running or not (num_in_flight == 0 or late):
            return False
        self.num_drained += 1
        self.depth = min(self.depth + 1, self.most)
        self.num_on_time = 0
        return True

    def sent(self, now_s: float, num_plans: int, num_in_flight: int) -> None:
        """The dispatch at ``now_s`` sent ``num_plans`` plans and left ``num_in_flight`` in
        flight; a run of plans with no shortage takes one plan back."""
        self._last_s, self._left_in_flight = now_s, num_in_flight
        self.num_on_time += num_plans
        if self.num_on_time >= RELAX_AFTER_PLANS and self.depth > self.least:
            self.depth -= 1
            self.num_on_time = 0


def has_running(core: SchedulerCore, worker_id: str) -> bool:
    """The worker holds running jobs (a worker with only paused or no jobs is idle, not
    starved, when it has no plan)."""
    return core.workers[worker_id].num_with_status(JobStatus.RUNNING) > 0


def keep_in_flight(core: SchedulerCore, worker_id: str, now_s: float, *, plans_ahead: int,
                   census: bool = False) -> list[AbortJobs | StepPlan]:
    """The messages for ``worker_id``, in the order they are to be sent: its pending aborts,
    if any, then plans until ``plans_ahead`` are in flight (none with ``plans_ahead=0``, or
    when there is nothing to do). ``census``: the first plan asks the worker for its jobs."""
    messages: list[AbortJobs | StepPlan] = []
    job_ids, through = core.take_aborts(worker_id)
    if job_ids:
        messages.append(AbortJobs(tuple(job_ids), through))
    while core.num_in_flight(worker_id) < plans_ahead:
        plan = core.schedule(worker_id, now_s, census=census)
        if plan.is_empty:
            break
        messages.append(plan)
        census = False
    return messages
