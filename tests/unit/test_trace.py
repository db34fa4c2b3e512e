"""Trace builder: arrival rates and burstiness, lengths, file round trip, rescaling."""

from __future__ import annotations

import statistics

import pytest

from alise.sim.trace import (
    TraceRequest, arrival_times, build_trace, describe, read_trace, rescale, write_trace,
)

PAIRS = [(f"p{i}", "word " * (i % 7 + 1), "tok " * (i % 13)) for i in range(50)]


def count_words(texts):
    return [len(t.split()) for t in texts]


def gaps(times):
    return [b - a for a, b in zip([0.0] + times, times)]


def test_poisson_arrivals_have_the_rate_and_cv_one():
    g = gaps(arrival_times(20_000, 4.0, seed=1))
    assert statistics.fmean(g) == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(1.0, rel=0.05)


def test_bursty_arrivals_keep_the_rate_with_cv_three():
    g = gaps(arrival_times(50_000, 4.0, bursty=True, cv=3.0, seed=1))
    assert statistics.fmean(g) == pytest.approx(0.25, rel=0.08)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(3.0, rel=0.1)


def test_build_trace_counts_lengths_and_floors_outputs_at_one():
    trace = build_trace(PAIRS, num=120, rate=2.0, seed=3, count_tokens=count_words)
    by_id = {pid: (prompt, out) for pid, prompt, out in PAIRS}
    for r in trace:
        prompt, out = by_id[r.id]
        assert r.prompt == prompt and r.prompt_tokens == len(prompt.split())
        assert r.output_tokens == max(len(out.split()), 1)
    # 120 requests from 50 prompts: every prompt used before any is reused a third time
    counts = [sum(r.id == pid for r in trace) for pid, _, _ in PAIRS]
    assert min(counts) >= 2 and max(counts) <= 3
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)


def test_same_seed_same_trace_other_seed_other_trace():
    a = build_trace(PAIRS, num=30, rate=1.0, seed=5, count_tokens=count_words)
    assert a == build_trace(PAIRS, num=30, rate=1.0, seed=5, count_tokens=count_words)
    assert a != build_trace(PAIRS, num=30, rate=1.0, seed=6, count_tokens=count_words)


def test_write_read_round_trip_and_rescale(tmp_path):
    trace = build_trace(PAIRS, num=40, rate=1.0, seed=0, count_tokens=count_words)
    path = tmp_path / "t.jsonl"
    write_trace(trace, path)
    assert read_trace(path) == trace
    fast = rescale(trace, 10.0)
    assert describe(fast)["rate"] == pytest.approx(10.0)
    assert [r.output_tokens for r in fast] == [r.output_tokens for r in trace]


def test_read_trace_names_a_missing_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "prompt_tokens": 1, "arrival_s": 0}\n')
    with pytest.raises(ValueError, match="output_tokens"):
        read_trace(path)


def test_arrival_times_reject_bad_rates():
    with pytest.raises(ValueError, match="rate"):
        arrival_times(3, 0.0)
    assert isinstance(TraceRequest("a", "b", 1, 1, 0.0), TraceRequest)
