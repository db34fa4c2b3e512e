"""The core's fast path (``SchedulerCore._schedule_fast``) decides exactly as the reference path.

Two cores are driven side by side on random job sets, each with its own virtual workers: one
plans with the reference path (``fast=False``: the four phases over Python lists), the other
with the fast one (numpy columns, incremental). Every plan (commands in order, step jobs, run
flag) and, at the end, every job's state and the KV-move counters must be equal. Ties (equal
arrival times, equal predictions), multi-worker routing, host memory, cancels, refused admits,
lost workers, a changing latency correction and late arrivals are all drawn. The helpers are
also checked against the straightforward code they replace.
"""

from __future__ import annotations

import random

import numpy as np
from alise.core.blocks import WorkerCapacity
from alise.core.candidates import JobColumns, TieLabels
from alise.core.commands import Admit, Refusal, StepReport
from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.memory_planner import expected_waits, make_memory_planner
from alise.core.policy import make_policy
from alise.core.sampling import SamplingParams
from alise.core.scheduler import SchedulerCore, _select_runs, _sort_by_key
from alise.sim.virtual_worker import VirtualWorker
from hypothesis import given, settings
from hypothesis import strategies as st

BS = 4


def _latency() -> LatencyModel:
    return LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-4, c_pre2_s=1e-8,
                        name="test")


class Side:
    """One core with its virtual workers."""

    def __init__(self, spec: dict, fast: bool) -> None:
        self.latency = _latency()
        policy = make_policy(spec["policy"], self.latency, **spec["policy_kwargs"])
        memory = None
        if spec["planner"] is not None:
            memory = make_memory_planner(spec["planner"], self.latency, block_bytes=1 << 20,
                                         swap_bytes_per_s=1e10)
        self.core = SchedulerCore(policy, memory, fast=fast)
        self.targets: dict[str, int] = {}
        self.workers: dict[str, VirtualWorker] = {}
        for wid, (blocks, host, seqs, tokens) in spec["workers"].items():
            self.add_worker(wid, blocks, host, seqs, tokens)

    def add_worker(self, wid, blocks, host, seqs, tokens) -> None:
        self.core.add_worker(WorkerCapacity(wid, BS, blocks, host, 160, seqs, tokens,
                                            block_bytes=1 << 20))
        self.workers[wid] = VirtualWorker(num_device_blocks=blocks, block_size=BS,
                                          max_model_len=160, latency=self.latency,
                                          num_host_blocks=host, target_lengths=self.targets,
                                          block_bytes=1 << 20, swap_bytes_per_s=1e10)

    def submit(self, spec: tuple) -> None:
        job_id, prompt, out, predicted, arrival, max_tokens = spec
        estimate = None if predicted is None else LengthEstimate(predicted, predicted,
                                                                 predicted * 1.7, "test")
        self.targets[job_id] = out
        self.core.submit(Job(job_id, [1] * prompt, SamplingParams(max_tokens=max_tokens),
                             arrival_s=arrival, estimate=estimate, oracle_output_tokens=out))

    def step(self, wid: str, now: float, refuse_admit: bool):
        plan = self.core.schedule(wid, now)
        seen = plan_repr(plan)
        commands = plan.commands
        refused_by_us = []
        if refuse_admit:
            admits = [c for c in commands if isinstance(c, Admit)]
            if admits:
                commands = [c for c in commands if c is not admits[-1]]
                refused_by_us = [Refusal(admits[-1].job_id, "admit", "test")]
        worker = self.workers[wid]
        refused = worker.apply(commands) + refused_by_us
        report = worker.step(plan.step_id) if plan.run_step else StepReport(
            plan.step_id, num_free_device_blocks=worker.allocator.num_free)
        report.refused = refused
        self.core.apply_report(wid, report, now)
        return seen


def plan_repr(plan) -> str:
    return repr((plan.step_id, plan.commands, plan.run_step, sorted(plan.step_jobs.items())))


def job_state(core: SchedulerCore, jobs) -> list:
    return [(j.job_id, j.status, j.kv, j.worker_id, j.num_output_tokens, j.num_preemptions,
             j.queued_s, j.idle_since_s, j.finish_s) for j in jobs]


def check_phases(core: SchedulerCore, wid: str, now: float) -> None:
    """The fast path's order, keys and expected waits equal the reference phases' on the
    same state (more sensitive than the decisions, which a small error may not change)."""
    if getattr(core.policy, "max_slowdown", None) is not None:
        return
    view = core.workers[wid]
    ranked = core._fast_order(view, now)
    ordered = core._order(list(view.jobs.values()) + core._waiting_for(view, now), now)
    cols = core._cols
    assert cols.ids[ranked.order].tolist() == [job.job_id for job in ordered]
    if ranked.keys is not None:
        assert ranked.keys.tolist() == core.policy.keys(ordered, now)
    positions = np.flatnonzero(ranked.mine[ranked.order])
    if len(positions):
        assert core._fast_waits(ranked, positions) == \
            expected_waits(ordered, core._remaining_s, set(view.jobs))


POLICY = st.sampled_from([
    ("fcfs", {}), ("alise", {}), ("oracle", {}),
    ("alise", {"aging_rate": 0.0}), ("alise", {"aging_rate": 0.5, "hysteresis": 0.0}),
    ("alise", {"preemptive": False}), ("alise", {"reserve_horizon_tokens": 0}),
    ("alise", {"reserve_horizon_tokens": 8, "reserve_fraction": 1.0}),
    ("oracle", {"aging_rate": 0.05, "switch_cost_s": 0.0}),
])


@settings(max_examples=120, deadline=None)
@given(POLICY, st.sampled_from([None, "adaptive", "drop", "swap", "quantize"]),
       st.integers(1, 2), st.data())
def test_fast_path_decides_exactly_as_the_reference(policy, planner, num_workers, data):
    name, kwargs = policy
    workers = {}
    for w in range(num_workers):
        workers[f"w{w}"] = (data.draw(st.integers(10, 48), "blocks"),
                            data.draw(st.sampled_from([0, 0, 12, 40]), "host"),
                            data.draw(st.integers(1, 6), "max_num_seqs"),
                            data.draw(st.sampled_from([8, 32, 4096]), "max_batched"))
    spec = dict(policy=name, policy_kwargs=kwargs, planner=planner, workers=workers)
    # Few distinct arrival times and predictions: equal keys and equal arrivals happen.
    arrivals = data.draw(st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.02, 0.05]), min_size=1,
                                  max_size=5))
    jobs = data.draw(st.lists(st.tuples(
        st.one_of(st.integers(1, 40), st.sampled_from([159, 160])),  # prompt (160 = limit)
        st.integers(1, 30),                                       # true output tokens
        st.one_of(st.none(), st.sampled_from([3.0, 10.0, 10.0, 25.0]), st.floats(1, 60)),
        st.sampled_from(arrivals),
        st.integers(0, 12)), min_size=1, max_size=14), "jobs")
    specs = [(f"j{i:02d}" if i % 3 else f"x{i}", p, o, e, a, o + slack)
             for i, (p, o, e, a, slack) in enumerate(jobs)]
    late = specs[len(specs) // 2:] if data.draw(st.booleans(), "late arrivals") else []
    sides = [Side(spec, fast=False), Side(spec, fast=True)]
    for side in sides:
        for s in specs:
            if s not in late:
                side.submit(s)
    now = 0.0
    for t in range(400):
        if late and data.draw(st.integers(0, 3)) == 0:
            for side in sides:
                side.submit(late[0])
            late.pop(0)
        if data.draw(st.integers(0, 19)) == 0 and sides[0].core.jobs:
            victim = data.draw(st.sampled_from(sorted(sides[0].core.jobs)))
            for side in sides:
                side.core.cancel(victim, now)
        if data.draw(st.integers(0, 9)) == 0:
            correction = data.draw(st.floats(0.5, 2.0))
            for side in sides:
                side.latency.correction = correction
        if num_workers == 2 and t == 40 and data.draw(st.booleans()):
            back = data.draw(st.sampled_from(["w1", "w2"]), "reconnects as")
            for side in sides:
                side.core.remove_worker("w1", now)
                del side.workers["w1"]
                side.add_worker(back, 30, 20, 3, 4096)
        refuse = data.draw(st.integers(0, 14)) == 0
        for wid in sorted(sides[0].workers):
            check_phases(sides[1].core, wid, now)
            a, b = (side.step(wid, now, refuse) for side in sides)
            assert b == a, (t, wid)
        now += data.draw(st.sampled_from([0.0, 0.001, 0.01, 0.013]))
        if not sides[0].core.jobs and not late:
            break
    ref, fast = sides
    assert fast.core._fast, "the fast path gave up"
    assert fast.core.kv_moves == ref.core.kv_moves
    assert fast.core.preemptions == ref.core.preemptions
    assert sorted(fast.core.jobs) == sorted(ref.core.jobs)
    assert job_state(fast.core, fast.core.jobs.values()) == \
        job_state(ref.core, ref.core.jobs.values())


def test_fast_path_is_used_by_the_built_in_policies_and_not_with_starvation():
    for name in ("fcfs", "alise", "oracle"):
        side = Side(dict(policy=name, policy_kwargs={}, planner=None,
                         workers={"w0": (20, 0, 4, 4096)}), fast=True)
        side.submit(("a", 5, 3, 4.0, 0.0, 10))
        called = []
        original = side.core._schedule_fast
        side.core._schedule_fast = lambda *args: called.append(1) or original(*args)
        side.step("w0", 0.0, False)
        assert called
    starving = Side(dict(policy="alise", policy_kwargs={"max_slowdown": 3.0}, planner=None,
                         workers={"w0": (20, 0, 4, 4096)}), fast=True)
    starving.submit(("a", 5, 3, 4.0, 0.0, 10))
    starving.core._schedule_fast = None  # would raise if called
    starving.step("w0", 0.0, False)


def _walk(need, feed, max_blocks, max_tokens, max_seqs, backfill):
    """``SchedulerCore._select`` without reserves, over plain lists."""
    taken, used, tokens = [], 0, 0
    for i, (n, f) in enumerate(zip(need, feed)):
        if len(taken) == max_seqs or used == max_blocks:
            break
        if taken and tokens >= max_tokens:
            break
        if used + n <= max_blocks and (tokens + f <= max_tokens or not taken):
            taken.append(i)
            used += n
            tokens += f
        elif not backfill:
            break
    return taken


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.sampled_from([1, 1, 1, 5, 30])), max_size=60),
       st.integers(1, 60), st.integers(1, 80), st.integers(1, 20), st.booleans())
def test_select_runs_equals_the_walk(cands, max_blocks, max_tokens, max_seqs, backfill):
    need = np.array([c[0] for c in cands], dtype=np.int64)
    feed = np.array([c[1] for c in cands], dtype=np.int64)
    cap = WorkerCapacity("w", 1, max_blocks, 0, 1 << 20, max_seqs, max_tokens)
    got = _select_runs(need, feed, cap, backfill).tolist()
    assert got == _walk(need.tolist(), feed.tolist(), max_blocks, max_tokens, max_seqs, backfill)


def _walk_reserving(need, feed, grow, running, max_blocks, max_tokens, max_seqs, backfill):
    """``SchedulerCore._select_walk`` over plain lists: growth reserves in blocks."""
    taken, used, tokens, reserved = [], 0, 0, 0.0
    for i, (n, f, g, r) in enumerate(zip(need, feed, grow, running)):
        if len(taken) == max_seqs or used == max_blocks:
            break
        if taken and tokens >= max_tokens:
            break
        limit = max_blocks if r else max_blocks - reserved - g
        if used + n <= limit and (tokens + f <= max_tokens or not taken):
            taken.append(i)
            used += n
            tokens += f
            reserved += g
        elif not backfill:
            break
    return taken


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.sampled_from([1, 1, 1, 5, 30]),
                          st.sampled_from([0.0, 0.1, 0.25, 1.0 / 3, 1.6, 4.0, 7.5]), st.booleans()),
                max_size=60),
       st.integers(1, 60), st.integers(1, 80), st.integers(1, 20), st.booleans())
def test_select_runs_with_reserves_equals_the_walk(cands, max_blocks, max_tokens, max_seqs, backfill):
    need = np.array([c[0] for c in cands], dtype=np.int64)
    feed = np.array([c[1] for c in cands], dtype=np.int64)
    grow = np.array([c[2] for c in cands], dtype=np.float64)
    running = np.array([c[3] for c in cands], dtype=bool)
    cap = WorkerCapacity("w", 1, max_blocks, 0, 1 << 20, max_seqs, max_tokens)
    got = _select_runs(need, feed, cap, backfill, grow, running).tolist()
    assert got == _walk_reserving(need.tolist(), feed.tolist(), grow.tolist(), running.tolist(),
                                  max_blocks, max_tokens, max_seqs, backfill)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, -0.0, 1.5, 1.5, 2.0, -1e6, 3.25]),
                          st.integers(0, 10_000)), max_size=40, unique_by=lambda t: t[1]),
       st.randoms())
def test_sort_by_key_equals_sorting_by_key_then_label(items, rnd):
    rnd.shuffle(items)
    keys = np.array([k for k, _ in items], dtype=np.float64)
    ties = np.array([t for _, t in items], dtype=np.int64)
    got = _sort_by_key(keys, ties).tolist()
    assert got == sorted(range(len(items)), key=lambda i: (items[i][0], items[i][1]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 1.0, 1.0, 2.5, 7.0]),
                          st.integers(0, 40)), max_size=80),
       st.sampled_from([2, 4, 1 << 32]))
def test_tie_labels_follow_arrival_then_job_id(ops, spacing):
    import alise.core.candidates as candidates

    old = candidates._SPACING
    candidates._SPACING = spacing  # tiny gaps force relabelling
    try:
        labels = TieLabels()
        live: dict[str, Job] = {}
        for add, arrival, n in ops:
            job_id = f"j{n}"
            if add and job_id not in live:
                live[job_id] = Job(job_id, [1], SamplingParams(), arrival_s=arrival)
                labels.add(live[job_id])
            elif not add and job_id in live:
                labels.remove(live.pop(job_id))
            by_label = sorted(live, key=lambda j: labels.label[j])
            assert by_label == sorted(live, key=lambda j: (live[j].arrival_s, j))
            assert set(labels.label) == set(live)
    finally:
        candidates._SPACING = old


def test_job_columns_grow_and_reuse_slots():
    cols = JobColumns(capacity=2)
    jobs = [Job(f"j{i}", [1] * (i + 1), SamplingParams(), arrival_s=float(i)) for i in range(9)]
    for i, job in enumerate(jobs):
        cols.put(job, -1, i)
    assert len(cols) == 9 and len(cols.jobs) >= 9
    for job in jobs[::2]:
        cols.discard(job.job_id)
    live = np.flatnonzero(cols.owner != -2)
    assert sorted(cols.ids[live].tolist()) == [j.job_id for j in jobs[1::2]]
    assert sorted(cols.ntok[live].tolist()) == [2, 4, 6, 8]
    cols.put(Job("new", [1] * 3, SamplingParams(), arrival_s=0.0), 0, 99)
    assert len(cols) == 5 and cols.ntok[cols.slot_of["new"]] == 3


def test_numpy_cumsum_and_elementwise_ops_round_like_python():
    # The fast path relies on this: sequential accumulation and one rounding per operation.
    rng = random.Random(0)
    xs = [rng.random() * 10 ** rng.randint(-8, 8) for _ in range(5000)]
    acc, sums = 0.0, []
    for x in xs:
        acc += x
        sums.append(acc)
    assert np.cumsum(np.array(xs)).tolist() == sums
    a = np.array(xs)
    assert (a * 1.7 - 0.3 * (a + np.maximum(2.5 - a, 0.0))).tolist() == \
        [x * 1.7 - 0.3 * (x + max(2.5 - x, 0.0)) for x in xs]
