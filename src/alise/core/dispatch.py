"""What goes down a worker's stream after a batch of events: aborts first, then plans ahead.

A worker runs step k while the core plans step k + 1 from the report of step k - 1, so the
device never waits for a plan: the core keeps ``plans_ahead`` plans in flight per worker
(1: lock-step). :func:`keep_in_flight` is that rule, written once; the scheduler's engine
sends what it returns on the worker's stream, the simulator hands it to its virtual worker,
and the tests drive the core with it.

Order matters: the aborts go first, at once (the worker applies them at its next step
boundary, ahead of the plans it holds: a cancelled job costs no step beyond the one running),
and name the last plan sent before them; every plan made after them is newer, so a job
aborted and re-admitted in the same round (a refusal re-queued onto the same worker) is
admitted again after its abort.
"""

from __future__ import annotations

from alise.core.commands import AbortJobs, StepPlan
from alise.core.scheduler import SchedulerCore


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
