"""The alise policy's rules (hysteresis, starvation bound, aging bound, cached keys) and
multi-worker routing, on the pure core with virtual workers."""

from __future__ import annotations

from alise.core.blocks import WorkerCapacity
from alise.core.commands import Admit, Pause
from alise.core.config import SchedulingConfig
from alise.core.job import JobStatus, LengthEstimate
from alise.core.policy import STARVED_BOOST_S, AlisePolicy, RemainingTimeEstimator
from alise.tools.sim.virtual_worker import virtual_worker
from corekit import LATENCY, is_starved, key_of, make_job, make_scheduler, step


def test_cached_remaining_times_equal_fresh_ones_while_jobs_wait_run_and_pause():
    # Four jobs on one sequence slot, alise preempting: jobs start, pause (their KV kept or
    # dropped), resume and finish. At every step the table's remaining times, cached per idle
    # spell, equal those computed afresh from the jobs.
    core, worker = make_scheduler("alise", num_blocks=12, block_size=4, max_num_seqs=2,
                                  aging_rate=0.1, max_slowdown=3.0, min_starve_s=0.5)
    for i in range(4):
        core.submit(make_job(f"j{i}", 5 + i, max_tokens=40, predicted=10 * (4 - i), arrival_s=0.1 * i))
    est = core.estimator
    for t in range(400):
        step(core, worker, now_s=0.05 * t)
        for job in core.jobs.values():
            slot = core.table.slot_of[job.job_id]
            core.table.fill_remaining(__import__("numpy").array([slot]))
            if job.status is not JobStatus.RUNNING:
                assert core.table.remaining_base_s[slot] == est.remaining_base_s(job, core.policy.estimate_of(job))
        if not core.jobs:
            break
    assert not core.jobs and core.num_finished == 4


def test_hysteresis_keeps_a_running_job_against_a_slightly_shorter_rival():
    # 100 tokens left vs a newcomer of 80: 80 > 100 * (1 - 0.3), so no preemption; a
    # newcomer of 20 is shorter by more than the margin and displaces it.
    for rival, preempted in ((80, False), (20, True)):
        core, worker = make_scheduler("alise", num_blocks=64, max_num_seqs=1, aging_rate=0.0,
                                      hysteresis=0.3, targets={"long": 500})
        core.submit(make_job("long", 10, max_tokens=1000, predicted=100))
        step(core, worker)
        core.submit(make_job("new", 10, max_tokens=1000, predicted=rival, arrival_s=0.01))
        plan, _ = step(core, worker, now_s=0.01)
        pauses = [c.job_id for c in plan.commands if isinstance(c, Pause)]
        assert pauses == (["long"] if preempted else []), rival


def test_starvation_rule_puts_a_starved_job_first_and_is_bounded():
    # Unloaded cost of a token for a 10-token prompt: step_s(1, 10) = 10.11 ms. A job
    # predicted at 300 tokens starves after max_slowdown * 300 * 10.11 ms = 6.07 s (>= floor).
    policy = AlisePolicy(LATENCY, SchedulingConfig(aging_rate=0.0, max_slowdown=2.0, min_starve_s=1.0))
    long = make_job("long", 10, max_tokens=1000, predicted=300, arrival_s=0.0)
    fresh = make_job("fresh", 10, max_tokens=1000, predicted=2, arrival_s=6.0)
    threshold = 2.0 * 300 * LATENCY.step_s(1, 10)
    assert not is_starved(policy, long, threshold - 0.01)
    assert key_of(policy, long, threshold - 0.01) > key_of(policy, fresh, threshold - 0.01)
    assert is_starved(policy, long, threshold + 0.01)
    assert key_of(policy, long, threshold + 0.01) < -STARVED_BOOST_S / 2 < key_of(policy, fresh, threshold)
    # a short job is never "starved" before the floor
    short = make_job("s", 10, max_tokens=1000, predicted=1, arrival_s=0.0)
    assert not is_starved(policy, short, 0.99) and is_starved(policy, short, 1.01)


def test_aging_bound_waiting_job_overtakes_after_remaining_over_rate():
    policy = AlisePolicy(LATENCY, SchedulingConfig(aging_rate=0.5, hysteresis=0.0))
    long = make_job("long", 10, max_tokens=1000, predicted=300, arrival_s=0.0)
    remaining = RemainingTimeEstimator(LATENCY).remaining_s(long, long.estimate)
    fresh_at = lambda t: make_job("f", 10, max_tokens=1000, predicted=1, arrival_s=t)  # noqa: E731
    bound = remaining / 0.5
    assert key_of(policy, long, 0.9 * bound) > key_of(policy, fresh_at(0.9 * bound), 0.9 * bound)
    assert key_of(policy, long, 1.01 * bound) < key_of(policy, fresh_at(1.01 * bound), 1.01 * bound)


def two_workers(policy="alise"):
    core, w0 = make_scheduler(policy, num_blocks=64, max_num_seqs=4)
    core.add_worker(WorkerCapacity("w1", 16, 64, 0, 2048, 4, 4096))
    w1 = virtual_worker(num_device_blocks=64, block_size=16, max_model_len=2048, latency=LATENCY)
    return core, {"w0": w0, "w1": w1}


def test_a_new_job_goes_to_the_worker_where_it_finishes_first():
    core, workers = two_workers()
    for i in range(3):
        core.submit(make_job(f"busy{i}", 10, max_tokens=1000, predicted=800))
    step(core, workers["w0"], worker_id="w0")   # w0 takes all three (w1 had nothing yet)
    assert {j.worker_id for j in core.jobs.values()} == {"w0"}
    core.submit(make_job("new", 10, max_tokens=1000, predicted=50, arrival_s=0.1))
    # w0 plans first, but "new" is routed to idle w1 and w0 leaves it there
    plan0, _ = step(core, workers["w0"], now_s=0.1, worker_id="w0")
    assert not [c for c in plan0.commands if isinstance(c, Admit)]
    assert core.router.route_of("new") == "w1"
    plan1, _ = step(core, workers["w1"], now_s=0.1, worker_id="w1")
    assert [c.job_id for c in plan1.commands if isinstance(c, Admit)] == ["new"]


def test_routing_prefers_the_less_loaded_busy_worker():
    core, workers = two_workers()
    core.submit(make_job("a0", 10, max_tokens=1000, predicted=900))
    core.submit(make_job("a1", 10, max_tokens=1000, predicted=900))
    step(core, workers["w0"], worker_id="w0")
    core.submit(make_job("b0", 10, max_tokens=1000, predicted=100, arrival_s=0.01))
    step(core, workers["w1"], now_s=0.01, worker_id="w1")
    core.submit(make_job("x", 10, max_tokens=1000, predicted=100, arrival_s=0.02))
    step(core, workers["w0"], now_s=0.02, worker_id="w0")
    assert core.router.route_of("x") == "w1"   # 100 tokens of backlog beat 1,800


def test_an_idle_worker_takes_a_job_routed_elsewhere():
    core, workers = two_workers()
    core.submit(make_job("a", 10, max_tokens=1000, predicted=100))
    core.router.assign("a", core.workers["w0"].index)
    plan, _ = step(core, workers["w1"], worker_id="w1")   # w1 has nothing: it takes "a"
    assert [c.job_id for c in plan.commands if isinstance(c, Admit)] == ["a"]
    assert core.jobs["a"].worker_id == "w1"


def test_estimates_are_never_the_truth_in_alise():
    job = make_job("j", 10, max_tokens=1000, oracle=7)
    job.estimate = LengthEstimate(500, 500, 900)
    policy = AlisePolicy(LATENCY)
    assert policy.estimate_of(job).mean == 500
