"""Simulator: determinism, the metrics it is judged by, and sanity against the policies."""

from __future__ import annotations

import math

import pytest

from alise.core.job import LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.policy import make_policy
from alise.sim.simulator import SimConfig, simulate
from alise.sim.sweep import (
    MAX_WORK_BACKLOG_GROWTH, capacity_bound, summarize, tail_p99, throughput_at_constraint,
    unloaded_normalized_latency,
)
from alise.sim.trace import TraceRequest, arrival_times

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
    return simulate(trace, make_policy(policy, LATENCY, **kw), LATENCY, config,
                    estimates=estimates)


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


def test_policy_args_parse_numbers_none_and_booleans():
    from alise.sim.report import parse_policy_args

    assert parse_policy_args(["aging_rate=0.01", "max_slowdown=none", "preemptive=false",
                              "reserve_horizon_tokens=64"]) == dict(
        aging_rate=0.01, max_slowdown=None, preemptive=False, reserve_horizon_tokens=64)
    assert parse_policy_args([]) == {}
    with pytest.raises(SystemExit):
        parse_policy_args(["aging_rate"])


def test_policy_args_reach_alise_and_oracle_not_fcfs():
    from alise.sim.sweep import sweep

    latency = LatencyModel()
    reqs = [TraceRequest(id=f"p{i}", prompt="", prompt_tokens=8, output_tokens=4 + i % 5,
                         arrival_s=0.01 * i) for i in range(20)]
    base = sweep(reqs, ["fcfs", "alise"], [50.0], latency, SimConfig(kv_tokens=256))
    varied = sweep(reqs, ["fcfs", "alise"], [50.0], latency, SimConfig(kv_tokens=256),
                   policy_kwargs=dict(preemptive=False, hysteresis=0.9))
    assert base[0].mean_normalized_latency_s == varied[0].mean_normalized_latency_s  # fcfs
    with pytest.raises(TypeError):
        sweep(reqs, ["alise"], [50.0], latency, SimConfig(kv_tokens=256),
              policy_kwargs=dict(no_such_knob=1))


def test_work_backlog_counts_tokens_not_jobs():
    # 30 short jobs and 3 long ones, all at once: at the last arrival nothing is generated yet.
    burst = [TraceRequest(f"b{i}", "x", 8, 300 if i < 3 else 10, 0.0) for i in range(33)]
    assert run("oracle", burst).work_backlog_at_last_arrival == 1.0
    # One more short job later: by then the oracle finished the shorts and part of the longs.
    # Few jobs are unfinished, yet the longs still hold most of the work.
    late = burst + [TraceRequest("late", "x", 8, 10, 0.9)]
    s = summarize(run("oracle", late), 1.0)
    assert s.backlog_at_last_arrival <= 4 / 34
    assert s.work_backlog_at_last_arrival > 4 * s.backlog_at_last_arrival
    # far after everything finished: only the last job's own tokens are left
    idle = burst + [TraceRequest("idle", "x", 8, 10, 1000.0)]
    assert summarize(run("fcfs", idle), 1.0).work_backlog_at_last_arrival == pytest.approx(
        10 / (3 * 300 + 30 * 10 + 10))


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
