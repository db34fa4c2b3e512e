"""Simulator: determinism, the metrics it is judged by, and sanity against the policies."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest

from alise.core.config import SchedulingConfig
from alise.core.job import Job, JobStatus, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.sampling import SamplingParams
from alise.tools.sim.simulator import SimConfig, WorkMeter, backlog_growth, simulate
from alise.tools.sim.sweep import (
    MAX_WORK_BACKLOG_GROWTH,
    RunSummary,
    capacity_bound,
    summarize,
    tail_p99,
    throughput_at_constraint,
    unloaded_normalized_latency,
)
from alise.tools.trace import TraceRequest, arrival_times

LATENCY = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-4, name="test")
CONFIG = SimConfig(kv_tokens=2048, max_num_seqs=16, max_model_len=1024, max_tokens=1024)


def mixed_trace(num=60, rate=30.0, seed=0):
    times = arrival_times(num, rate, seed=seed)
    # every fourth job is long: head-of-line blocking for fcfs
    return [TraceRequest(f"r{i}", "x", 8 + i % 5, 200 if i % 4 == 0 else 10, t)
            for i, t in enumerate(times)]


def run(policy, trace, config=CONFIG, **kw):
    estimates = {i: LengthEstimate(r.output_tokens, r.output_tokens, 2 * r.output_tokens)
                 for i, r in enumerate(trace)}
    scheduling = dataclasses.replace(config.scheduling, policy=policy, **kw)
    return simulate(trace, LATENCY, dataclasses.replace(config, scheduling=scheduling), estimates=estimates)


def test_simulation_is_deterministic_and_labelled():
    trace = mixed_trace()
    a, b = run("alise", trace), run("alise", trace)
    assert a.records == b.records and a.makespan_s == b.makespan_s
    assert a.label == "simulated" and a.profile == "test"


def test_every_job_finishes_with_its_trace_length():
    trace = mixed_trace()
    for policy in ("fcfs", "alise", "oracle"):
        result = run(policy, trace)
        assert sorted(r.output_tokens for r in result.records) == sorted(
            r.output_tokens for r in trace)
        assert all(r.finish_s >= r.first_token_s >= r.arrival_s for r in result.records)


def test_shortest_first_beats_fcfs_on_a_mixed_loaded_trace():
    trace = mixed_trace()
    narrow = SimConfig(kv_tokens=2048, max_num_seqs=2, max_model_len=1024, max_tokens=1024)
    mean = {p: summarize(run(p, trace, narrow), 30.0).mean_normalized_latency_s
            for p in ("fcfs", "alise", "oracle")}
    assert mean["oracle"] < 0.5 * mean["fcfs"]
    assert mean["alise"] < 0.5 * mean["fcfs"]  # its estimates here rank like the truth


def test_unloaded_latency_matches_a_lone_job_in_the_simulator():
    trace = [TraceRequest("a", "x", 20, 50, 0.0)]
    result = run("fcfs", trace)
    assert result.records[0].normalized_latency_s == pytest.approx(
        unloaded_normalized_latency(trace, LATENCY), rel=1e-9)


def test_throughput_at_constraint_interpolates_on_a_hand_made_curve():
    rates = [1, 2, 3, 4]
    latency = [1.0, 1.5, 3.0, 9.0]
    # bound 2.0 crosses between rate 2 (1.5) and 3 (3.0): 2 + (2.0 - 1.5) / 1.5
    assert throughput_at_constraint(rates, latency, 2.0) == (pytest.approx(2 + 1 / 3), False)
    assert throughput_at_constraint(rates, latency, 9.0) == (4, True)      # never crossed
    assert throughput_at_constraint(rates, latency, 0.5) == (0.0, False)  # even the lowest fails
    # an unsustained run (infinite latency) ends the curve at the last good rate
    assert throughput_at_constraint(rates, [1.0, 1.5, math.inf, 2.0], 5.0) == (2, False)
    # only the first crossing counts
    assert throughput_at_constraint(rates, [1.0, 3.0, 1.0, 1.0], 2.0)[0] == pytest.approx(1.5)


def test_tail_is_the_p99_of_the_longest_five_percent():
    class R:
        def __init__(self, i, out, nl):
            self.job_id, self.output_tokens, self.normalized_latency_s = f"j{i}", out, nl

    records = [R(i, i, 1.0) for i in range(95)] + [R(100 + i, 1000 + i, 10.0 + i) for i in range(5)]
    assert tail_p99(records) == 14.0


def test_sim_takes_the_schedulers_flags_and_refuses_a_bad_one():
    from alise.cli.main import build_parser
    from alise.tools.sim.report import sim_config

    def parse(*argv):
        return build_parser().parse_args(["sim", "--trace", "t.jsonl", *argv])

    config, policies = sim_config(parse("--aging-rate", "0.01", "--no-preemptive", "--max-slowdown", "4",
                                        "--prefill-step-ratio", "0", "--kv-planner", "swap"))
    assert policies == ["fcfs", "alise", "oracle"]
    assert config.scheduling == SchedulingConfig(aging_rate=0.01, preemptive=False, max_slowdown=4.0,
                                                 prefill_step_ratio=0.0, kv_planner="swap")
    assert sim_config(parse())[0].scheduling == SchedulingConfig()
    with pytest.raises(ValueError, match="hysteresis must be in"):
        sim_config(parse("--hysteresis", "1.5"))
    with pytest.raises(ValueError, match="policy must be one of fcfs, alise, oracle, got 'sjf'"):
        sim_config(parse("--policies", "fcfs,sjf"))


def test_scheduling_knobs_reach_alise_and_oracle_not_fcfs():
    from alise.tools.sim.sweep import sweep

    narrow = SimConfig(kv_tokens=2048, max_num_seqs=2, max_model_len=1024, max_tokens=1024)
    base = sweep(mixed_trace(), ["fcfs", "alise"], [30.0], LATENCY, narrow)
    varied = sweep(mixed_trace(), ["fcfs", "alise"], [30.0], LATENCY,
                   dataclasses.replace(narrow, scheduling=SchedulingConfig(preemptive=False)))
    assert [r.policy for r in varied] == ["fcfs", "alise"]
    assert base[0].mean_normalized_latency_s == varied[0].mean_normalized_latency_s  # fcfs
    assert base[1].num_preemptions > 0 and varied[1].num_preemptions == 0  # alise, not preemptive


def test_work_backlog_counts_work_not_jobs():
    # 30 short jobs and 3 long ones, all at once: at the last arrival nothing is generated yet.
    burst = [TraceRequest(f"b{i}", "x", 8, 300 if i < 3 else 10, 0.0) for i in range(33)]
    assert run("oracle", burst).work_backlog_at_last_arrival == 1.0
    # One more short job later: by then the oracle finished the shorts and part of the longs.
    # Few jobs are unfinished, yet the longs still hold most of the work.
    late = burst + [TraceRequest("late", "x", 8, 10, 0.9)]
    s = summarize(run("oracle", late), 1.0)
    assert s.backlog_at_last_arrival <= 4 / 34
    assert s.work_backlog_at_last_arrival > 4 * s.backlog_at_last_arrival
    # far after everything finished: only the last job's own decode steps are left
    idle = burst + [TraceRequest("idle", "x", 8, 10, 1000.0)]
    assert run("fcfs", idle).work_backlog_at_last_arrival == pytest.approx(9 / (3 * 299 + 31 * 9))


def test_work_meter_counts_decode_steps_and_kv_token_steps():
    # "a": prompt 8, 3 tokens: tokens 2 and 3 decode from contexts 9 and 10 (19 token-steps);
    # "b": prompt 100, 2 tokens: token 2 from context 101.
    meter = WorkMeter({"a": (8, 3), "b": (100, 2)})
    assert meter.total_steps == 2 + 1 and meter.total_memory == 19 + 101
    assert [meter.steps_left("a", g) for g in (0, 1, 2, 3)] == [2, 2, 1, 0]
    assert [meter.memory_left("a", g) for g in (0, 1, 2, 3)] == [19, 19, 10, 0]
    # a finished job owes nothing, however few tokens it made (a cancelled one, say)
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b = Job("a", [1] * 8, sampling, 0.0), Job("b", [1] * 100, sampling, 0.0)
    a.output_token_ids = [5]
    assert meter.left([a, b]) == pytest.approx((2 / 3 + 1 / 3, (19 + 101) / 120))
    a.status = JobStatus.FINISHED
    assert meter.left([a, b]) == pytest.approx((1 / 3, 101 / 120))


def test_work_backlog_at_each_arrival_by_hand():
    # each job finishes long before the next arrives: the backlog is its own work
    lengths = (10, 20, 30, 40, 12, 90, 14, 60)
    spaced = [TraceRequest(f"s{i}", "x", 8, n, 100.0 * i) for i, n in enumerate(lengths)]
    res = run("fcfs", spaced)
    steps = [n - 1 for n in lengths]
    assert res.work_backlog == pytest.approx([k / sum(steps) for k in steps])
    assert res.work_backlog_at_mid_arrival == pytest.approx(39 / 268)
    assert res.work_backlog_at_last_arrival == pytest.approx(59 / 268)
    # window means: last quarter (14, 60) less second quarter (30, 40), not last less middle
    assert res.work_backlog_growth == pytest.approx(((13 + 59) / 2 - (29 + 39) / 2) / 268)
    assert res.work_backlog_growth != pytest.approx((59 - 39) / 268)
    # in KV token-steps job n needs (n - 1) (8 + n / 2)
    work = [(n - 1) * (8 + n / 2) for n in lengths]
    assert res.kv_backlog == pytest.approx([w / sum(work) for w in work])


def test_a_job_cut_short_by_the_model_length_leaves_no_phantom_backlog():
    # 5,000 tokens asked for, but a 1,024-token model ends it after 1,016
    long_then_short = [TraceRequest("long", "x", 8, 5000, 0.0),
                       TraceRequest("short", "x", 8, 10, 1000.0)]
    res = run("fcfs", long_then_short)
    assert [r.output_tokens for r in sorted(res.records, key=lambda r: r.arrival_s)] == [1016, 10]
    assert res.work_backlog == pytest.approx([1015 / 1024, 9 / 1024])
    work = [1015 * (8 + 1016 / 2), 9 * (8 + 10 / 2)]
    assert res.kv_backlog == pytest.approx([work[0] / sum(work), work[1] / sum(work)])


def test_jobs_count_to_their_max_tokens_and_the_workers_kv():
    trace = [TraceRequest("long", "x", 8, 5000, 0.0), TraceRequest("short", "x", 8, 10, 1000.0)]
    # the request's max_tokens (300) ends it first
    capped = SimConfig(kv_tokens=2048, max_num_seqs=16, max_model_len=1024, max_tokens=300)
    res = run("fcfs", trace, capped)
    assert [r.output_tokens for r in sorted(res.records, key=lambda r: r.arrival_s)] == [300, 10]
    assert res.work_backlog == pytest.approx([299 / 308, 9 / 308])
    # a worker with 512 tokens of KV ends a sequence at 512 tokens, below the model's 1,024
    small = SimConfig(kv_tokens=512, max_num_seqs=16, max_model_len=1024, max_tokens=1024)
    res = run("fcfs", trace, small)
    assert [r.output_tokens for r in sorted(res.records, key=lambda r: r.arrival_s)] == [504, 10]
    assert res.work_backlog == pytest.approx([503 / 512, 9 / 512])


def test_a_run_is_sustained_while_its_work_backlog_stays_level():
    def trace(rate):
        times = arrival_times(300, rate, seed=3)
        return [TraceRequest(f"r{i}", "x", 8, 40 + (i * 37) % 120, t) for i, t in enumerate(times)]

    bound = capacity_bound(trace(1.0), LATENCY, CONFIG)
    light = summarize(run("alise", trace(0.5 * bound)), 0.5 * bound, bound)
    assert light.sustained and abs(light.work_backlog_growth) < MAX_WORK_BACKLOG_GROWTH
    for policy in ("fcfs", "alise", "oracle"):  # overload: no order hides a growing backlog
        heavy = summarize(run(policy, trace(0.95 * 2 * bound)), 0.95 * 2 * bound, bound)
        assert heavy.work_backlog_growth > 0.15 and not heavy.sustained
    above = summarize(run("alise", trace(1.02 * bound)), 1.02 * bound, bound)
    assert not above.sustained  # beyond the bound, whatever its backlog


def test_no_policy_finishes_a_burst_faster_than_the_capacity_bound():
    burst = [TraceRequest(f"b{i}", "x", 8 + i % 7, 20 + (i * 37) % 180, 0.0) for i in range(80)]
    bound = capacity_bound(burst, LATENCY, CONFIG)
    for policy in ("fcfs", "alise", "oracle"):
        achieved = len(burst) / run(policy, burst).makespan_s
        assert achieved <= bound
        assert achieved >= 0.5 * bound  # a bound, but not a vacuous one


def test_backlog_growth_compares_the_last_quarter_with_the_second():
    samples = [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    assert backlog_growth(samples) == pytest.approx(0.3 - 0.1)
    # one outlier at the last arrival moves a two-point difference, barely the window means
    noisy = [0.1] * 99 + [0.3]
    assert backlog_growth(noisy) == pytest.approx(0.2 / 25)
    assert backlog_growth([0.2, 0.5]) == pytest.approx(0.3)
    assert backlog_growth([]) == 0.0


def test_capacity_bound_by_hand():
    latency = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-4,
                           correction=2.0, c_cycle_s=0.005, name="hand")
    config = SimConfig(kv_tokens=64, max_num_seqs=16, max_model_len=1024, max_tokens=1024)
    reqs = [TraceRequest("a", "x", 10, 20, 0.0),   # n = 19 decode steps, contexts 11..29
            # the 64-token KV ends it at 63 tokens; a one-token prompt has no prefill term
            TraceRequest("b", "x", 1, 100, 0.0)]
    mem = (19 * 10 + 19 * 20 / 2) + (62 * 1 + 62 * 63 / 2)
    seqs = 19 + 62
    steps = max(mem / 64, seqs / 16)
    seconds = steps * (0.01 * 2.0 + 0.005) + 2.0 * (1e-6 * mem + 1e-4 * seqs + 1e-4 * 10)
    assert capacity_bound(reqs, latency, config) == pytest.approx(2 / seconds)
    # a max_tokens of 10 ends both at 10 tokens: 9 decode steps each
    capped = SimConfig(kv_tokens=64, max_num_seqs=16, max_model_len=1024, max_tokens=10)
    mem = (9 * 10 + 9 * 10 / 2) + (9 * 1 + 9 * 10 / 2)
    steps = max(mem / 64, 18 / 16)
    seconds = steps * (0.01 * 2.0 + 0.005) + 2.0 * (1e-6 * mem + 1e-4 * 18 + 1e-4 * 10)
    assert capacity_bound(reqs, latency, capped) == pytest.approx(2 / seconds)


def test_no_policy_beats_the_capacity_bound_where_memory_binds():
    config = SimConfig(kv_tokens=1024, max_num_seqs=64, max_model_len=1024, max_tokens=1024)
    burst = [TraceRequest(f"m{i}", "x", 32, 100 + (i * 37) % 100, 0.0) for i in range(40)]
    mem = sum((r.output_tokens - 1) * (32 + r.output_tokens / 2) for r in burst)
    assert mem / 1024 > 3 * sum(r.output_tokens - 1 for r in burst) / 64  # memory binds
    bound = capacity_bound(burst, LATENCY, config)
    for policy in ("fcfs", "alise", "oracle"):
        achieved = len(burst) / run(policy, burst, config).makespan_s
        assert 0.5 * bound <= achieved <= bound


def test_a_run_above_the_capacity_bound_is_never_sustained():
    def summary(rate, growth):
        return RunSummary("alise", rate, 0.05, 0.1, 0.1, 1.0, rate, 10.0, 100, 1000, 0, 0.1,
                          work_backlog_growth=growth, capacity_bound_req_s=8.0)

    assert summary(8.0, 0.0).sustained
    assert not summary(8.5, 0.0).sustained
    assert not summary(4.0, MAX_WORK_BACKLOG_GROWTH + 0.001).sustained
    assert summary(8.5, 0.0).constrained_latency_s == math.inf


def test_the_simulator_follows_the_schedulers_prefill_step_ratio():
    """Long prompts arriving beside running decodes: the cap slows their prefill (first tokens
    come later), as it does on the real path; 0 turns it off; the ratio is checked."""
    times = arrival_times(40, 40.0, seed=1)
    trace = [TraceRequest(f"r{i}", "x", 600 if i % 2 else 20, 40, t) for i, t in enumerate(times)]
    config = SimConfig(kv_tokens=32_768, max_num_seqs=32, max_model_len=1024, max_tokens=1024)
    ttft = {}
    for ratio in (0.0, 1.5):
        cfg = dataclasses.replace(config, scheduling=SchedulingConfig(prefill_step_ratio=ratio))
        records = run("fcfs", trace, cfg).records
        ttft[ratio] = sum(r.first_token_s - r.arrival_s for r in records) / len(records)
    assert ttft[1.5] > 1.5 * ttft[0.0]
    with pytest.raises(ValueError, match="prefill_step_ratio"):
        SchedulingConfig(prefill_step_ratio=1.0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_redraws_in_place_a_few_times_a_second_on_a_terminal_only():
    from alise.tools.sim.progress import ERASE, ProgressLine

    now = [0.0]
    term = _Terminal()
    line = ProgressLine.for_flag(None, term)
    line.clock = lambda: now[0]
    line.update("a")
    now[0] = 0.1
    line.update("b")  # too soon: not drawn
    now[0] = 0.3
    line.update("c" * 500)  # cut to the width (160 where the stream does not say)
    line.phase("done")
    assert term.getvalue() == ERASE + "a" + ERASE + "c" * 159 + ERASE + "done\n"
    line.update("d")  # drawn at once after a phase line
    assert term.getvalue().endswith("done\n" + ERASE + "d")

    piped = io.StringIO()  # CI logs, pipes: only the finished phases
    line = ProgressLine.for_flag(None, piped)
    line.update("a")
    line.phase("done")
    line.clear()
    assert piped.getvalue() == "done\n"
    silent = io.StringIO()
    line = ProgressLine.for_flag(False, silent)
    line.update("a")
    line.phase("done")
    assert silent.getvalue() == ""
    forced = io.StringIO()
    ProgressLine.for_flag(True, forced).update("a")
    assert forced.getvalue() == ERASE + "a"


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_sweep_reports_each_policy_and_rate_as_it_runs(jobs):
    from alise.tools.sim.sweep import sweep

    trace = mixed_trace(num=40)
    events = []
    runs = sweep(trace, ["fcfs", "oracle"], [10.0, 30.0], LATENCY, CONFIG, jobs=jobs, progress=events.append)
    quiet = sweep(trace, ["fcfs", "oracle"], [10.0, 30.0], LATENCY, CONFIG, jobs=jobs)
    assert [dataclasses.replace(r, wall_s=0) for r in runs] == [
        dataclasses.replace(r, wall_s=0) for r in quiet]
    for policy in ("fcfs", "oracle"):
        mine = [e for e in events if e.policy == policy]
        # every run reports as it starts (nothing finished yet); the sweep's end comes last
        assert {(e.rate_index, e.rate) for e in mine if e.num_finished == 0} == {(0, 10.0), (1, 30.0)}
        assert all(e.num_jobs == 40 and e.num_rates == 2 and 0 <= e.num_finished <= 40 for e in mine)
        assert [e.done for e in mine].count(True) == 1 and mine[-1].done and mine[-1].rate_index == 1


def test_alise_sim_shows_progress_on_stderr(tmp_path, capsys):
    from alise.cli.main import main
    from alise.tools.trace import write_trace

    path = tmp_path / "mixed.jsonl"
    write_trace(mixed_trace(num=40), path)
    argv = ["sim", "--trace", str(path), "--policies", "fcfs,oracle", "--rates", "10,30",
            "--kv-tokens", "2048", "--png", str(tmp_path / "sim.png")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    # not a terminal: one line per finished sweep (the two policies run side by side) and nothing else
    assert sorted(line.partition(" in ")[0] for line in captured.err.splitlines()) == [
        "sim mixed: fcfs swept 2 of 2 rates", "sim mixed: oracle swept 2 of 2 rates"]
    assert "\r" not in captured.err and "mean normalized latency" in captured.out
    assert main(argv + ["--progress", "--jobs", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r\x1b[Ksim mixed: fcfs rate 1/2 (10 req/s) 0/40 jobs" in err
    assert main(argv + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_each_plan_in_flight_costs_a_new_job_one_step_before_its_first_token():
    """A job that arrives while another decodes runs behind the plans already sent: with
    three in flight its prefill comes two steps after the running one, with two (the
    ``min_plans_ahead`` a worker keeps while its plans come in time) one step, lock-step none."""
    trace = [TraceRequest("a", "x", 8, 300, 0.0), TraceRequest("b", "x", 8, 10, 0.5)]
    ttft = {}
    for least, most in ((3, 3), (2, 3), (1, 1)):
        result = run("fcfs", trace, plans_ahead=most, min_plans_ahead=least)
        ttft[least] = next(r.ttft_s for r in result.records if r.job_id == "r1")  # "b", by index
    step_s = LATENCY.c0_s  # a decode step of two short sequences: c0 and a little
    assert step_s < ttft[3] - ttft[2] < 1.1 * step_s
    assert step_s < ttft[2] - ttft[1] < 1.1 * step_s
