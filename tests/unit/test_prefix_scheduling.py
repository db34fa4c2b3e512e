"""Prefix caching in the scheduler core: a job starts after its cached prefix (its plan feeds
only the rest), shared blocks count once, the mirror agrees with the worker's cache block for
block, and the router prefers the worker holding a prefix."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from alise.core.blocks import WorkerCapacity
from alise.core.config import SchedulingConfig
from alise.core.job import Job, JobStatus
from alise.core.policy import make_policy
from alise.core.sampling import SamplingParams
from alise.core.scheduler import SchedulerCore
from alise.tools.sim.virtual_worker import virtual_worker
from alise.worker.engine import WorkerEngine
from corekit import LATENCY, step

BS = 16


def make_cached(num_blocks: int, *, policy: str = "fcfs", workers: int = 1, max_num_seqs: int = 8,
                num_host_blocks: int = 0) -> tuple[SchedulerCore, dict[str, WorkerEngine]]:
    core = SchedulerCore(make_policy(SchedulingConfig(policy=policy), LATENCY))
    engines = {}
    for w in range(workers):
        core.add_worker(WorkerCapacity(f"w{w}", BS, num_blocks, num_host_blocks, 2048, max_num_seqs, 4096,
                                       prefix_caching=True))
        engines[f"w{w}"] = virtual_worker(num_device_blocks=num_blocks, block_size=BS, max_model_len=2048,
                                          latency=LATENCY, num_host_blocks=num_host_blocks, prefix_caching=True)
    return core, engines


def job(job_id: str, tokens: list[int], max_tokens: int = 4) -> Job:
    return Job(job_id, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_s=0.0)


def run_until_done(core: SchedulerCore, worker: WorkerEngine, limit: int = 200) -> list:
    plans = []
    for _ in range(limit):
        plan, _ = step(core, worker)
        if plan.is_empty:
            return plans
        plans.append(plan)
    raise AssertionError("did not finish")


def test_a_follow_up_turn_computes_only_what_is_not_cached():
    core, engines = make_cached(20)
    worker = engines["w0"]
    first = job("t0", list(range(1, 41)), max_tokens=8)
    core.submit(first)
    run_until_done(core, worker)
    # Turn 1 finished with 47 computed positions: blocks 0-1 are cached (block 2 is partial).
    follow = job("t1", first.all_token_ids() + list(range(500, 520)))
    core.submit(follow)
    assert core.table.num_cached_hint[core.table.slot_of["t1"]] == 2 * BS  # its remaining time prices the rest
    plans = run_until_done(core, worker)
    [admit] = plans[0].commands
    assert admit.num_cached_tokens == 2 * BS
    assert plans[0].chunks == {"t1": 68 - 2 * BS}
    assert follow.status is JobStatus.FINISHED and follow.num_output_tokens == 4
    counts = core.prefill
    assert (counts.num_admitted_tokens, counts.num_cached_tokens, counts.num_computed_tokens) == (108, 32, 76)


def test_jobs_reading_one_prefix_count_its_blocks_once():
    # 8 blocks: a 4-block cached prefix and 2 private blocks for each of two jobs fit only
    # when the prefix counts once (twice it would take 12).
    core, engines = make_cached(8)
    worker = engines["w0"]
    core.submit(job("seed", list(range(1, 66)), max_tokens=1))
    run_until_done(core, worker)
    assert worker.allocator.num_cached_free == 4
    prefix = list(range(1, 65))
    core.submit(job("a", prefix + [700] * 20, max_tokens=12))
    core.submit(job("b", prefix + [800] * 20, max_tokens=12))
    both = False
    for _ in range(40):
        plan, _ = step(core, worker)
        view = core.workers["w0"]
        assert view.num_free_device_blocks == worker.kv.num_free_device  # the same count, exactly
        if plan.is_empty:
            break
        running = {j for j, s in worker.seqs.items() if not s.paused}
        both |= running == {"a", "b"}
    assert both and not core.jobs
    assert worker.allocator.num_used == 0


def test_the_router_prefers_the_worker_holding_the_prefix():
    core, engines = make_cached(40, workers=2)
    seed = job("seed", list(range(1, 100)), max_tokens=2)
    core.submit(seed)
    # An idle worker takes what is routed elsewhere: drive w1 only, so the seed runs there.
    for _ in range(10):
        step(core, engines["w1"], worker_id="w1")
    assert seed.is_finished and seed.worker_id == "w1"
    core.submit(job("next", seed.all_token_ids() + [9] * 30))
    core.submit(job("other", list(range(300, 400))))
    slots = np.array([core.table.slot_of["next"], core.table.slot_of["other"]])
    core.router.route_new(slots, core.latency.correction, core.planner._prefix_saving_s)
    # Both workers are idle: without the prefix, ties go to w0.
    assert core.router.route_of("next") == "w1" and core.router.route_of("other") == "w0"


def test_a_dropped_job_is_priced_by_what_its_worker_no_longer_caches():
    """Six blocks, two jobs of 40 prompt tokens: at 49 tokens "a" needs a fourth block, and the
    newest, "b", is dropped with 48 known tokens computed. Its three full blocks stay cached, so
    its remaining time prices no recompute beyond its next token; as "a" grows into those
    blocks they are evicted (its tail first) and the price of its resume grows, plan by plan,
    up to a recompute of all 49 tokens once none is left."""
    core, engines = make_cached(6)
    worker = engines["w0"]
    a, b = job("a", list(range(1, 41)), max_tokens=60), job("b", list(range(100, 140)), max_tokens=60)
    core.submit(a)
    core.submit(b)
    table, slot = core.table, core.table.slot_of["b"]

    def remaining_s(num_computed: int) -> float:
        """What the estimator charges "b" with ``num_computed`` of its tokens in place."""
        estimate = core.policy.estimate_of(b)
        seconds, _ = core.estimator.remaining_base_arrays(b.num_generated, b.num_tokens, num_computed,
                                                          b.sampling.max_tokens, estimate.mean, estimate.p90)
        return float(seconds)

    while not b.is_dropped:
        step(core, worker)
    assert b.num_tokens == 49 and a.num_computed_tokens == 49  # a's fourth block
    cached, priced = [], []
    full = remaining_s(0)  # a recompute of all 49 tokens
    while b.is_dropped:
        table.fill_remaining(np.array([slot]))
        cached.append(int(table.num_cached_hint[slot]))
        priced.append(float(table.remaining_base_s[slot]))
        assert priced[-1] == remaining_s(cached[-1])
        step(core, worker)
    assert cached[0] == 3 * BS and cached[-1] < cached[0] and sorted(cached, reverse=True) == cached
    assert priced[0] < priced[-1] <= full
    assert (core.prefill.num_drop_cached_tokens, core.prefill.num_resume_cached_tokens) == (cached[0], cached[-1])


# ----------------------------------------------------------------- random conversations

@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32))
@example(1)  # a dropped job resumed, then cancelled: its admitted tokens still bound what is cached
def test_the_mirror_agrees_with_the_worker_over_random_conversations(seed):
    """Turns that extend earlier turns, new conversations and cancels on a small cache, lock
    step: after every report the core's free blocks are the worker's, the mirror's cached
    prefixes are all on the worker, and no admit is ever refused."""
    rng = random.Random(seed)
    # alise with host blocks: its planner keeps, quantizes, swaps, prefetches or drops paused jobs.
    core, engines = make_cached(16, policy=rng.choice(["fcfs", "alise"]), max_num_seqs=4, num_host_blocks=12)
    worker = engines["w0"]
    done: list[Job] = []
    live: dict[str, Job] = {}
    refused = []
    original_apply = core.apply_report

    def recording(worker_id, report, now_s):
        refused.extend(report.refused)
        return original_apply(worker_id, report, now_s)

    core.apply_report = recording
    for n in range(150):
        r = rng.random()
        if r < 0.3 and len(live) < 10:
            base = rng.choice(done).all_token_ids() if done and rng.random() < 0.7 else [rng.randrange(1, 9)] * 20
            new = job(f"j{n}", base + [rng.randrange(1000)] * rng.randrange(1, 40), max_tokens=rng.randrange(1, 20))
            live[new.job_id] = new
            core.submit(new)
        elif r < 0.35 and live:
            core.cancel(rng.choice(sorted(live)), 0.0)
        step(core, worker)
        for job_id in [j for j, x in live.items() if x.is_finished]:
            finished = live.pop(job_id)
            if finished.finish_reason.value != "aborted":
                done.append(finished)
        view = core.workers["w0"]
        assert view.num_free_device_blocks == worker.kv.num_free_device
        assert view.prefix.cache.num_free == worker.allocator.num_free
        assert view.prefix.cache.num_cached_free == worker.allocator.num_cached_free
    assert not refused, refused
    worker.kv.drain()
    assert core.prefill.num_cached_tokens > 0 or len(done) < 2
