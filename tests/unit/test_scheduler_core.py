"""The scheduler core, driven lock-step against a virtual worker (no gRPC, no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alise.core.commands import AbortJobs, Admit, KvAction, Pause, Resume
from alise.core.dispatch import keep_in_flight
from alise.core.job import JobStatus, KvPlace, LengthEstimate
from alise.core.policy import RemainingTimeEstimator
from corekit import LATENCY, candidates_of, make_job, make_scheduler, step


def commands_of(plan, kind):
    return [c for c in plan.commands if isinstance(c, kind)]


def test_pure_core_imports_neither_grpc_nor_torch():
    code = ("import sys, alise.core.scheduler, alise.core.policy, alise.core.latency_model, "
            "alise.core.blocks, alise.core.dispatch, alise.core.build, alise.tools.sim.virtual_worker; "
            "print(sorted(m for m in ('grpc', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fcfs_admits_in_arrival_order_within_the_sequence_budget():
    core, worker = make_scheduler("fcfs", num_blocks=64, max_num_seqs=2)
    for i in range(3):
        core.submit(make_job(f"j{i}", 10, arrival_s=float(i)))
    plan, _ = step(core, worker)
    assert [c.job_id for c in commands_of(plan, Admit)] == ["j0", "j1"]
    assert core.jobs["j2"].status is JobStatus.WAITING


def test_chunked_prefill_feeds_prompts_within_the_token_budget():
    # Budget 25 tokens a step. Step 1: j0 and j1 feed their 10-token prompts, j2 the 5 left
    # (a chunk: no token yet). Step 2: j0 and j1 decode (2 tokens set aside first) and j2
    # feeds its last 5 tokens, which yields its first token.
    core, worker = make_scheduler("fcfs", num_blocks=64, max_num_batched_tokens=25)
    for i in range(3):
        core.submit(make_job(f"j{i}", 10, arrival_s=float(i)))
    plan, events = step(core, worker)
    assert [c.job_id for c in commands_of(plan, Admit)] == ["j0", "j1", "j2"]
    assert plan.chunks == {"j0": 10, "j1": 10, "j2": 5}
    assert sorted(e.job_id for e in events) == ["j0", "j1"]
    plan, events = step(core, worker)
    assert plan.chunks == {"j2": 5} and not plan.commands  # decodes are implicit
    assert sorted(e.job_id for e in events) == ["j0", "j1", "j2"]
    assert [e.index for e in events if e.job_id == "j2"] == [0]


def test_a_long_prompt_never_stalls_the_decodes_beside_it():
    # A 100-token prompt arrives beside two decoding jobs, budget 20: every step decodes
    # both and feeds at most 18 prompt tokens, so the prompt takes 6 steps and no step feeds
    # more than 20 tokens.
    core, worker = make_scheduler("fcfs", num_blocks=64, block_size=16, max_num_batched_tokens=20)
    core.submit(make_job("a", 5, max_tokens=30))
    core.submit(make_job("b", 5, max_tokens=30))
    step(core, worker)
    core.submit(make_job("long", 100, max_tokens=5, arrival_s=1.0))
    fed = []
    for t in range(6):
        plan, events = step(core, worker, now_s=1.0 + t)
        assert {"a", "b"} <= {e.job_id for e in events}
        fed.append(plan.chunks.get("long", 0))
        assert worker.last_step_shape[1] and sum(worker.last_step_shape[2]) + 2 <= 20
    assert fed == [18, 18, 18, 18, 18, 10] and core.jobs["long"].num_output_tokens == 1


def test_fcfs_preempts_the_newest_by_recompute_when_blocks_run_out():
    # block_size 4, 6 blocks. Prompts 8, 8, 7 take 2 + 2 + 2 = 6 blocks. After one step they
    # hold 9, 9, 8 tokens and the next step needs 3 + 3 + 2 = 8 > 6 blocks: the newest (j2)
    # is paused with its KV dropped, leaving 3 + 3 = 6 for the two oldest.
    core, worker = make_scheduler("fcfs", num_blocks=6, block_size=4)
    for i, n in enumerate([8, 8, 7]):
        core.submit(make_job(f"j{i}", n, arrival_s=float(i)))
    step(core, worker)
    plan, _ = step(core, worker)
    # The drop names j2's known tokens (7 of prompt, 1 output): their computed full blocks stay cached.
    assert commands_of(plan, Pause) == [Pause("j2", KvAction.DROP, num_reusable_tokens=8)]
    assert core.jobs["j2"].kv is KvPlace.NONE
    assert core.jobs["j2"].status is JobStatus.PAUSED
    assert worker.allocator.num_free == 0
    assert core.preemptions["drop"] == 1


def test_fcfs_does_not_skip_a_job_that_does_not_fit():
    # 8 blocks of 4: "a" (18 tokens) takes 5, "big" (14 tokens) needs 4 more: 9 > 8, so it
    # waits, and FCFS keeps "small" (1 block, which would fit) behind it.
    core, worker = make_scheduler("fcfs", num_blocks=8, block_size=4, max_model_len=32)
    core.submit(make_job("a", 18, arrival_s=0.0))
    core.submit(make_job("big", 14, arrival_s=1.0))
    core.submit(make_job("small", 2, arrival_s=2.0))
    plan, _ = step(core, worker)
    assert [c.job_id for c in commands_of(plan, Admit)] == ["a"]


def test_a_job_never_outgrows_the_whole_cache():
    # 12 blocks of 4 hold 48 tokens: a 27-token prompt asking for 40 more ends at 48 (LENGTH).
    core, worker = make_scheduler("fcfs", num_blocks=12, block_size=4, max_model_len=200)
    core.submit(make_job("j", 27, max_tokens=40))
    produced = 0
    for _ in range(100):
        _, events = step(core, worker)
        produced += sum(len(e.token_ids) for e in events)
        if not core.jobs:
            break
    assert produced == 48 - 27 and not core.jobs


def test_every_job_finishes_with_exact_token_counts():
    targets = {f"j{i}": 5 + 3 * i for i in range(6)}
    core, worker = make_scheduler("fcfs", num_blocks=10, block_size=4, targets=targets)
    for i in range(6):
        core.submit(make_job(f"j{i}", 6 + i, arrival_s=float(i)))
    produced = {job_id: 0 for job_id in targets}
    for _ in range(500):
        _, events = step(core, worker)
        for e in events:
            assert e.index == produced[e.job_id]
            produced[e.job_id] += len(e.token_ids)
        if not core.jobs:
            break
    assert produced == targets
    assert worker.allocator.num_free == 10


def test_cancel_aborts_on_the_worker_and_frees_its_blocks():
    """The abort goes out ahead of any plan, naming the last plan sent (step 1); the plan
    after it carries no command for the job."""
    core, worker = make_scheduler("fcfs", num_blocks=8, block_size=4)
    core.submit(make_job("a", 8))
    step(core, worker)
    assert worker.allocator.num_free < 8
    assert core.cancel("a", now_s=1.0)
    core.submit(make_job("b", 4, arrival_s=1.0))
    aborts, plan = keep_in_flight(core, "w0", 1.0, plans_ahead=1)
    assert aborts == AbortJobs(("a",), 1)
    assert [c.job_id for c in plan.commands] == ["b"]
    worker.abort(aborts.job_ids, aborts.through_step_id)
    assert not worker.seqs and worker.allocator.num_free == 8
    core.apply_report("w0", worker.run(plan), 1.0)
    assert set(worker.seqs) == {"b"} and set(core.jobs) == {"b"}


def test_alise_preempts_a_long_running_job_for_a_short_newcomer_and_keeps_its_kv():
    core, worker = make_scheduler("alise", num_blocks=64, max_num_seqs=1,
                                  targets={"long": 900, "short": 5})
    core.submit(make_job("long", 10, max_tokens=1000, predicted=900))
    step(core, worker)
    core.submit(make_job("short", 10, max_tokens=1000, predicted=5, arrival_s=0.1))
    plan, _ = step(core, worker, now_s=0.1)
    assert commands_of(plan, Pause) == [Pause("long", KvAction.KEEP)]
    assert [c.job_id for c in commands_of(plan, Admit)] == ["short"]
    assert core.jobs["long"].kv is KvPlace.DEVICE
    # When the short job finishes, the long one resumes without recompute.
    for i in range(20):
        plan, _ = step(core, worker, now_s=0.2 + i * 0.01)
        if commands_of(plan, Resume):
            break
    assert commands_of(plan, Resume) == [Resume("long")]


def test_fcfs_never_preempts_for_a_newcomer():
    core, worker = make_scheduler("fcfs", num_blocks=64, max_num_seqs=1)
    core.submit(make_job("long", 10, predicted=900))
    step(core, worker)
    core.submit(make_job("short", 10, predicted=5, arrival_s=0.1))
    plan, _ = step(core, worker, now_s=0.1)
    assert not plan.commands and plan.run_step


def test_misprediction_rule_grows_the_estimate():
    est = RemainingTimeEstimator(LATENCY, overrun_growth=2.0)
    job = make_job("j", 10, max_tokens=10_000)
    estimate = LengthEstimate(mean=20, p50=20, p90=50)
    job.output_token_ids = [0] * 10
    assert est.remaining_output_tokens(job, estimate) == 10      # before the point estimate
    job.output_token_ids = [0] * 30
    assert est.remaining_output_tokens(job, estimate) == 20      # past it: up to p90
    job.output_token_ids = [0] * 80
    assert est.remaining_output_tokens(job, estimate) == 80      # past p90: doubles
    job.output_token_ids = [0] * 9_990
    assert est.remaining_output_tokens(job, estimate) == 10      # never past max_tokens


def test_aging_lets_a_long_job_run_despite_a_stream_of_short_ones():
    core, worker = make_scheduler("alise", num_blocks=256, max_num_seqs=1, aging_rate=1.0)
    core.submit(make_job("long", 10, max_tokens=300, predicted=300, arrival_s=0.0))
    started_at = None
    now = 0.0
    for i in range(400):
        now += 0.05
        core.submit(make_job(f"s{i}", 10, max_tokens=300, predicted=2, arrival_s=now))
        step(core, worker, now_s=now)
        if core.jobs.get("long") is None or core.jobs["long"].status is JobStatus.RUNNING:
            started_at = now
            break
    # Estimated remaining time of the long job: 300 tokens * ~10 ms = ~3 s; aging at 1 s/s
    # lets it overtake a 2-token job's key (~20 ms) after about 3 s of waiting.
    assert started_at is not None and started_at < 6.0


def test_oracle_orders_by_true_length():
    core, worker = make_scheduler("oracle", num_blocks=64, max_num_seqs=1)
    core.submit(make_job("a", 10, oracle=500, predicted=1, arrival_s=0.0))
    core.submit(make_job("b", 10, oracle=5, predicted=900, arrival_s=0.0))
    plan, _ = step(core, worker)
    assert [c.job_id for c in commands_of(plan, Admit)] == ["b"]


def test_a_job_of_known_length_ends_there_and_alise_never_sees_it():
    # Trace replay: max_tokens is a common cap, oracle_output_tokens the true length. The
    # worker is told to stop at the true length; alise's ranking uses only the estimate and the
    # cap, so a short job predicted long waits behind a long job predicted short.
    core, worker = make_scheduler("alise", num_blocks=64, max_num_seqs=1)
    core.submit(make_job("short", 10, max_tokens=2048, oracle=3, predicted=400, arrival_s=0.0))
    core.submit(make_job("long", 10, max_tokens=2048, oracle=40, predicted=20, arrival_s=0.0))
    short = core.jobs["short"]
    assert short.sampling.max_tokens == 2048 and short.worker_sampling.max_tokens == 3
    assert RemainingTimeEstimator(LATENCY).remaining_output_tokens(short, short.estimate) == 400
    plan, events = step(core, worker)
    assert [(c.job_id, c.sampling.max_tokens) for c in commands_of(plan, Admit)] == [("long", 40)]
    produced = {"short": 0, "long": 0}
    order = []
    for _ in range(200):
        for e in events:
            produced[e.job_id] += len(e.token_ids)
            if e.finish_reason is not None:
                order.append(e.job_id)
        if not core.jobs:
            break
        plan, events = step(core, worker)
    assert produced == {"short": 3, "long": 40} and order == ["long", "short"]
    # The oracle, by contrast, reads the true length and runs the short job first.
    core, worker = make_scheduler("oracle", num_blocks=64, max_num_seqs=1)
    core.submit(make_job("short", 10, max_tokens=2048, oracle=3, predicted=400, arrival_s=0.0))
    core.submit(make_job("long", 10, max_tokens=2048, oracle=40, predicted=20, arrival_s=0.0))
    plan, _ = step(core, worker)
    assert [(c.job_id, c.sampling.max_tokens) for c in commands_of(plan, Admit)] == [("short", 3)]


def test_growth_reserve_holds_back_a_job_whose_growth_would_not_fit():
    # block_size 4, 6 blocks. "short" (predicted 10 tokens) reserves 0.1 * 10 = 1 token, "long"
    # (predicted 200) 0.1 * 200 = 20 tokens = 5 blocks. Each needs 2 blocks now: both fit now,
    # but long's growth does not fit beside short (2 + 2 > 6 - 0.25 - 5), so only short starts.
    policy = make_scheduler("alise")[0].policy
    assert (policy.reserve_fraction, policy.reserve_horizon_tokens) == (0.1, 64)
    core, worker = make_scheduler("alise", num_blocks=6, block_size=4)
    core.submit(make_job("short", 8, max_tokens=2048, predicted=10))
    core.submit(make_job("long", 8, max_tokens=2048, predicted=200))
    assert core.policy.reserve_tokens(candidates_of(core, "long")).tolist() == [20.0]
    plan, _ = step(core, worker)
    assert [c.job_id for c in commands_of(plan, Admit)] == ["short"]
    # The cap: a job predicted at 10,000 tokens reserves 64, not 1,000.
    core.submit(make_job("huge", 8, max_tokens=20_000, predicted=10_000))
    assert core.policy.reserve_tokens(candidates_of(core, "huge")).tolist() == [64.0]
    # Without a reserve both start at once.
    core, worker = make_scheduler("alise", num_blocks=6, block_size=4, reserve_horizon_tokens=0)
    core.submit(make_job("short", 8, max_tokens=2048, predicted=10))
    core.submit(make_job("long", 8, max_tokens=2048, predicted=200))
    plan, _ = step(core, worker)
    assert [c.job_id for c in commands_of(plan, Admit)] == ["short", "long"]


def test_lost_worker_requeues_jobs_with_their_tokens():
    core, worker = make_scheduler("fcfs", num_blocks=16, block_size=4)
    core.submit(make_job("a", 5))
    for _ in range(3):
        step(core, worker)
    [job] = core.remove_worker("w0", now_s=1.0)
    assert job.status is JobStatus.WAITING and job.num_output_tokens == 3
    from alise.core.blocks import WorkerCapacity
    core.add_worker(WorkerCapacity("w1", 4, 16, 0, 2048, 8, 4096))
    plan = core.schedule("w1", 1.0)
    [admit] = commands_of(plan, Admit)
    assert admit.num_generated == 3 and len(admit.token_ids) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=12),
       st.sampled_from(["fcfs", "alise", "oracle"]), st.integers(12, 40), st.data())
def test_blocks_never_overcommitted_and_all_freed(jobs, policy, num_blocks, data):
    targets = {f"j{i}": out for i, (_, out) in enumerate(jobs)}
    core, worker = make_scheduler(policy, num_blocks=num_blocks, block_size=4, max_num_seqs=4,
                                  max_model_len=200, targets=targets)
    for i, (prompt, out) in enumerate(jobs):
        core.submit(make_job(f"j{i}", prompt, max_tokens=out + 5, predicted=data.draw(
            st.floats(1, 60)), oracle=out, arrival_s=i * 0.01))
    cancelled = set()
    for t in range(2000):
        if data.draw(st.booleans()) and data.draw(st.integers(0, 9)) == 0 and core.jobs:
            victim = sorted(core.jobs)[0]
            core.cancel(victim, t * 0.01)
            cancelled.add(victim)
        step(core, worker, now_s=t * 0.01)  # the kit asserts that no plan overcommits
        assert worker.allocator.num_used <= num_blocks
        if not core.jobs:
            break
    step(core, worker, now_s=99.0)  # deliver the last aborts
    assert not core.jobs and not worker.seqs
    assert worker.allocator.num_free == num_blocks


def _assert_table_mirrors_jobs(core):
    """The job table's token counts are the jobs' own (the core ranks and budgets on them)."""
    table = core.table
    for job in core.jobs.values():
        slot = table.slot_of[job.job_id]
        row = (table.num_tokens[slot], table.num_computed_tokens[slot])
        assert row == (job.num_tokens, job.num_computed_tokens), job.job_id


def _state(core):
    return {j.job_id: (list(j.output_token_ids), j.num_pending_outputs, j.num_computed_tokens, j.status)
            for j in core.jobs.values()}


def test_a_bad_report_is_refused_whole_and_changes_nothing():
    from dataclasses import replace

    from alise.core.reports import ReportError

    core, worker = make_scheduler("fcfs", num_blocks=64, block_size=4)
    for i in range(3):
        core.submit(make_job(f"j{i}", 6, max_tokens=20, arrival_s=float(i)))
    step(core, worker)
    step(core, worker)
    plan = core.schedule("w0", 1.0)
    good = worker.run(plan)
    first = good.outputs[0]
    bad_reports = {
        "wrong step": replace(good, step_id=good.step_id + 1),
        "wrong count": replace(good, outputs=[replace(first, num_tokens=first.num_tokens + 1)] + good.outputs[1:]),
        "twice": replace(good, outputs=good.outputs + [first]),
        "two tokens": replace(good, outputs=[replace(first, token_ids=[0, 0])] + good.outputs[1:]),
        "missing": replace(good, outputs=good.outputs[1:]),
    }
    before = _state(core)
    for name, report in bad_reports.items():
        with pytest.raises(ReportError):
            core.apply_report("w0", report, 1.0)
        assert _state(core) == before, name
    events = core.apply_report("w0", good, 1.0)
    assert [e.index for e in events] == [2, 2, 2]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 30)), min_size=1, max_size=12),
       st.sampled_from(["fcfs", "alise", "oracle"]), st.integers(12, 40), st.integers(2, 3),
       st.sampled_from([8, 16, 4096]), st.data())
def test_plans_in_flight_ahead_of_the_worker_stay_exact(jobs, policy, num_blocks, depth, budget, data):
    """The core plans ``depth`` steps ahead of the worker (reports come back late, in order):
    no plan overcommits the worker, every stream gets its tokens in order with no gap or
    repeat, cancelled jobs leave nothing behind."""
    targets = {f"j{i}": out for i, (_, out) in enumerate(jobs)}
    core, worker = make_scheduler(policy, num_blocks=num_blocks, block_size=4, max_num_seqs=4,
                                  max_num_batched_tokens=budget, max_model_len=200, targets=targets)
    for i, (prompt, out) in enumerate(jobs):
        core.submit(make_job(f"j{i}", prompt, max_tokens=out + 5, predicted=data.draw(
            st.floats(1, 60)), oracle=out, arrival_s=i * 0.01))
    produced = {job_id: 0 for job_id in targets}
    cancelled = set()
    in_flight = []
    for t in range(3000):
        now = t * 0.01
        if data.draw(st.integers(0, 30)) == 0 and core.jobs:
            victim = data.draw(st.sampled_from(sorted(core.jobs)))
            core.cancel(victim, now)
            cancelled.add(victim)
        for message in keep_in_flight(core, "w0", now, plans_ahead=depth):
            match message:
                case AbortJobs(job_ids, through):
                    worker.abort(job_ids, through)
                case plan:
                    in_flight.append(worker.run(plan))
        if not in_flight:
            if not core.jobs:
                break
            continue
        report = in_flight.pop(0)
        assert not [r for r in report.refused if r.command in ("step", "chunk")]
        for e in core.apply_report("w0", report, now):
            assert e.index == produced[e.job_id]
            produced[e.job_id] += len(e.token_ids)
        assert worker.allocator.num_used <= num_blocks
        _assert_table_mirrors_jobs(core)
    worker.abort(*core.take_aborts("w0"))
    assert not core.jobs and not worker.seqs and worker.allocator.num_free == num_blocks
    max_len = min(200, num_blocks * 4)  # a sequence never outgrows the whole cache
    for i, (prompt, out) in enumerate(jobs):
        if f"j{i}" not in cancelled:
            assert produced[f"j{i}"] == min(out, max_len - prompt), f"j{i}"


def test_a_chunk_beside_decodes_is_cut_to_the_latency_allowance():
    # Two decoding jobs of ~10 tokens: the test profile prices their step at ~10.2 ms, and a
    # chunk may add half of that: (0.5 * 10.22 ms - 0.1 ms) / 0.101 ms a token = 49 tokens,
    # though the token budget would allow 4,094.
    core, worker = make_scheduler("fcfs", num_blocks=64, block_size=16)
    core.submit(make_job("a", 5, max_tokens=30))
    core.submit(make_job("b", 5, max_tokens=30))
    step(core, worker)
    core.submit(make_job("long", 300, max_tokens=5, arrival_s=1.0))
    plan, _ = step(core, worker, now_s=1.0)
    assert plan.chunks == {"long": core.latency.chunk_allowance(2, 14, 1.5)} == {"long": 49}
    core.planner.prefill_step_ratio = 0  # no cap: the token budget alone
    plan, _ = step(core, worker, now_s=1.1)
    assert plan.chunks == {"long": 300 - 49}
