"""The alise policy's rules (hysteresis, starvation bound, aging bound, cached keys) and
multi-worker routing, on the pure core with virtual workers."""

from __future__ import annotations

from alise.core.blocks import WorkerCapacity
from alise.core.commands import Admit, Pause
from alise.core.job import JobStatus, KvPlace, LengthEstimate
from alise.core.policy import STARVED_BOOST_S, AlisePolicy
from alise.sim.virtual_worker import VirtualWorker
from corekit import LATENCY, make_job, make_scheduler, step


def test_batch_keys_equal_single_keys_while_jobs_wait_run_and_pause():
    policy = AlisePolicy(LATENCY, aging_rate=0.1, max_slowdown=3.0, min_starve_s=0.5)
    jobs = [make_job(f"j{i}", 5 + i, max_tokens=500, predicted=10 * (i + 1), arrival_s=0.1 * i)
            for i in range(6)]
    jobs[1].status = JobStatus.RUNNING
    jobs[1].kv = KvPlace.DEVICE
    jobs[2].status = JobStatus.PAUSED
    for now in (0.0, 0.7, 5.0):
        assert policy.keys(jobs, now) == [policy.key(j, now) for j in jobs]
        jobs[1].output_token_ids.append(0)          # running jobs change every step
    jobs[3].output_token_ids += [0] * 30             # a moved job comes back with tokens
    assert policy.keys(jobs, 6.0) == [policy.key(j, 6.0) for j in jobs]


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
    policy = AlisePolicy(LATENCY, aging_rate=0.0, max_slowdown=2.0, min_starve_s=1.0)
    long = make_job("long", 10, max_tokens=1000, predicted=300, arrival_s=0.0)
    fresh = make_job("fresh", 10, max_tokens=1000, predicted=2, arrival_s=6.0)
    threshold = 2.0 * 300 * LATENCY.step_s(1, 10)
    assert not policy.is_starved(long, threshold - 0.01)
    assert policy.key(long, threshold - 0.01) > policy.key(fresh, threshold - 0.01)
    assert policy.is_starved(long, threshold + 0.01)
    assert policy.key(long, threshold + 0.01) < -STARVED_BOOST_S / 2 < policy.key(fresh, threshold)
    # a short job is never "starved" before the floor
    short = make_job("s", 10, max_tokens=1000, predicted=1, arrival_s=0.0)
    assert not policy.is_starved(short, 0.99) and policy.is_starved(short, 1.01)


def test_aging_bound_waiting_job_overtakes_after_remaining_over_rate():
    policy = AlisePolicy(LATENCY, aging_rate=0.5, hysteresis=0.0)
    long = make_job("long", 10, max_tokens=1000, predicted=300, arrival_s=0.0)
    remaining = policy.estimator.remaining_s(long, long.estimate)
    fresh_at = lambda t: make_job("f", 10, max_tokens=1000, predicted=1, arrival_s=t)  # noqa: E731
    bound = remaining / 0.5
    assert policy.key(long, 0.9 * bound) > policy.key(fresh_at(0.9 * bound), 0.9 * bound)
    assert policy.key(long, 1.01 * bound) < policy.key(fresh_at(1.01 * bound), 1.01 * bound)


def two_workers(policy="alise"):
    core, w0 = make_scheduler(policy, num_blocks=64, max_num_seqs=4)
    core.add_worker(WorkerCapacity("w1", 16, 64, 0, 2048, 4, 4096))
    w1 = VirtualWorker(num_device_blocks=64, block_size=16, max_model_len=2048, latency=LATENCY)
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
    assert core.routes["new"] == "w1"
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
    assert core.routes["x"] == "w1"   # 100 tokens of backlog beat 1,800


def test_an_idle_worker_takes_a_job_routed_elsewhere():
    core, workers = two_workers()
    core.submit(make_job("a", 10, max_tokens=1000, predicted=100))
    core.routes["a"] = "w0"
    plan, _ = step(core, workers["w1"], worker_id="w1")   # w1 has nothing: it takes "a"
    assert [c.job_id for c in plan.commands if isinstance(c, Admit)] == ["a"]
    assert core.jobs["a"].worker_id == "w1"


def test_estimates_are_never_the_truth_in_alise():
    job = make_job("j", 10, max_tokens=1000, oracle=7)
    job.estimate = LengthEstimate(500, 500, 900)
    policy = AlisePolicy(LATENCY)
    assert policy.estimate_of(job).mean == 500
