"""keep_in_flight: what goes down a worker's stream after a batch of events (pure core)."""

from __future__ import annotations

from alise.core.commands import AbortJobs, Admit, Refusal, StepPlan
from alise.core.dispatch import RELAX_AFTER_PLANS, FlightDepth, has_running, keep_in_flight
from corekit import make_job, make_scheduler


def admitted(plan: StepPlan) -> list[str]:
    return [c.job_id for c in plan.commands if isinstance(c, Admit)]


def test_plans_up_to_the_depth_the_first_one_a_census():
    core, _ = make_scheduler("fcfs", num_blocks=40, block_size=4)
    core.submit(make_job("a", 8, max_tokens=20))
    first = keep_in_flight(core, "w0", 0.0, plans_ahead=2, census=True)
    assert [type(m) for m in first] == [StepPlan, StepPlan]
    assert [m.step_id for m in first] == [1, 2] and [m.census for m in first] == [True, False]
    assert keep_in_flight(core, "w0", 0.0, plans_ahead=2) == []  # two in flight already
    assert core.num_in_flight("w0") == 2


def test_aborts_go_first_naming_the_last_plan_sent_and_never_ride_in_a_plan():
    core, _ = make_scheduler("fcfs", num_blocks=40, block_size=4)
    core.submit(make_job("a", 8, max_tokens=20))
    keep_in_flight(core, "w0", 0.0, plans_ahead=1)
    core.cancel("a", 0.1)
    core.submit(make_job("b", 8, max_tokens=20, arrival_s=0.1))
    aborts, plan = keep_in_flight(core, "w0", 0.1, plans_ahead=2)
    assert aborts == AbortJobs(("a",), 1)
    assert admitted(plan) == ["b"] and all(c.job_id == "b" for c in plan.commands)


def test_a_worker_not_welcomed_yet_gets_its_aborts_alone():
    core, _ = make_scheduler("fcfs", num_blocks=40, block_size=4)
    core.submit(make_job("a", 8, max_tokens=20))
    keep_in_flight(core, "w0", 0.0, plans_ahead=1)
    core.cancel("a", 0.1)
    core.submit(make_job("b", 8, max_tokens=20, arrival_s=0.1))
    assert keep_in_flight(core, "w0", 0.1, plans_ahead=0) == [AbortJobs(("a",), 1)]
    assert core.num_in_flight("w0") == 1


def test_a_job_aborted_and_admitted_again_in_one_round_runs():
    """The worker refuses a command of job a: the core aborts it there and re-queues it, and
    the same round admits it again on the same worker. The abort names plan 1, the admit is in
    plan 2, so the worker frees the job and then takes it anew: it runs to its end."""
    core, worker = make_scheduler("fcfs", num_blocks=40, block_size=4, targets={"a": 6})
    core.submit(make_job("a", 8, max_tokens=20))
    [plan] = keep_in_flight(core, "w0", 0.0, plans_ahead=1)
    report = worker.run(plan)
    report.refused.append(Refusal("a", "pause", "refused by the test"))
    core.apply_report("w0", report, 0.0)
    aborts, again = keep_in_flight(core, "w0", 0.1, plans_ahead=1)
    assert aborts == AbortJobs(("a",), 1) and admitted(again) == ["a"] and again.step_id == 2
    worker.abort(aborts.job_ids, aborts.through_step_id)
    tokens = 0
    for t in range(20):
        tokens += sum(len(e.token_ids) for e in core.apply_report("w0", worker.run(again), 0.1 + t))
        if not core.jobs:
            break
        [again] = keep_in_flight(core, "w0", 0.2 + t, plans_ahead=1)
    assert tokens == 6 and not worker.seqs


def test_the_depth_rises_when_the_worker_ran_out_of_plans_and_falls_after_a_run_in_time():
    depth = FlightDepth(2, 3)
    assert depth.depth == 2
    assert not depth.dispatching(0.0, 0, has_running=False, step_s=0.01)  # idle, not starved
    depth.sent(0.0, 2, 2)
    assert not depth.dispatching(0.01, 1, has_running=True, step_s=0.01)  # a step later: one left
    depth.sent(0.01, 1, 2)
    assert depth.dispatching(0.02, 0, has_running=True, step_s=0.01)  # every report in, none left
    assert depth.depth == 3 and depth.num_drained == 1
    depth.sent(0.02, 3, 3)
    # A stalled loop: one report read of the three steps that ran; the time gone tells.
    assert depth.dispatching(0.06, 2, has_running=True, step_s=0.01)
    assert depth.depth == 3  # never past plans_ahead
    depth.sent(0.06, RELAX_AFTER_PLANS - 1, 3)
    assert depth.depth == 3
    depth.sent(0.07, 1, 3)
    assert depth.depth == 2
    depth.sent(0.08, 10 * RELAX_AFTER_PLANS, 2)
    assert depth.depth == 2  # never under min_plans_ahead
    assert FlightDepth(2, 1).depth == 1  # a least above the most is read as the most


def test_has_running_counts_running_jobs_only():
    core, worker = make_scheduler("fcfs", num_blocks=40, block_size=4)
    assert not has_running(core, "w0")
    core.submit(make_job("a", 8, max_tokens=20))
    assert not has_running(core, "w0")  # waiting: the worker has nothing to run yet
    [plan] = keep_in_flight(core, "w0", 0.0, plans_ahead=1)
    core.apply_report("w0", worker.run(plan), 0.01)
    assert has_running(core, "w0") and core.num_in_flight("w0") == 0


def test_the_depth_holds_while_the_workers_pace_is_unknown():
    """Before the worker's first report (no step time yet) plans in flight are not late: the
    dispatch that follows a new job's admit (an estimate, another request) keeps the depth."""
    depth = FlightDepth(2, 3)
    assert not depth.dispatching(0.0, 0, has_running=False, step_s=0.0)
    depth.sent(0.0, 2, 2)
    assert not depth.dispatching(0.001, 2, has_running=True, step_s=0.0)
    assert depth.depth == 2 and depth.num_drained == 0
