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


def test_prompts_without_outputs_take_a_fixed_length_or_draw_from_a_pool():
    prompts = [(f"s{i}", "word " * (i + 1), None) for i in range(30)]
    with pytest.raises(ValueError, match="no records with outputs"):
        build_trace(prompts, num=10, rate=1.0, count_tokens=count_words)
    fixed = build_trace(prompts, num=10, rate=1.0, count_tokens=count_words, output_lengths=64)
    assert {r.output_tokens for r in fixed} == {64}
    assert all(r.prompt_tokens == len(r.prompt.split()) for r in fixed)
    pool = [5, 50, 500]
    drawn = build_trace(prompts, num=90, rate=1.0, seed=4, count_tokens=count_words, output_lengths=pool)
    assert {r.output_tokens for r in drawn} == set(pool)
    # a prompt drawn again keeps the length it drew; the same seed draws the same lengths
    by_id = {}
    for r in drawn:
        assert by_id.setdefault(r.id, r.output_tokens) == r.output_tokens
    assert drawn == build_trace(prompts, num=90, rate=1.0, seed=4, count_tokens=count_words,
                                output_lengths=pool)
    with pytest.raises(ValueError, match=">= 1"):
        build_trace(prompts, num=3, rate=1.0, count_tokens=count_words, output_lengths=0)
    with pytest.raises(ValueError, match="empty"):
        build_trace(prompts, num=3, rate=1.0, count_tokens=count_words, output_lengths=[])


def _write_jsonl_gz(path, rows):
    import gzip
    import json

    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_alise_trace_on_prompt_only_data_names_the_flags_it_needs(tmp_path, capsys):
    from alise.cli.main import main

    prompts = tmp_path / "sharegpt_prompts.jsonl.gz"
    _write_jsonl_gz(prompts, [{"id": f"c{i}", "prompt": f"Question number {i} about gardens"}
                              for i in range(6)])
    out = tmp_path / "t.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(["trace", "--data", str(prompts), "--out", str(out), "--num", "4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no outputs" in err and "--output-len" in err and "--output-lens-from" in err
    assert "Traceback" not in err and not out.exists()

    assert main(["trace", "--data", str(prompts), "--out", str(out), "--num", "8", "--output-len", "40"]) == 0
    assert {r.output_tokens for r in read_trace(out)} == {40}
    assert "output lengths: 40 tokens each" in capsys.readouterr().out

    # lengths drawn from another data set's outputs (AlpacaEval's format), counted in tokens
    answers = tmp_path / "answers.jsonl.gz"
    _write_jsonl_gz(answers, [{"id": 0, "instruction": "a", "output": "yes"},
                              {"id": 1, "instruction": "b", "output": " ".join(["cat"] * 30)}])
    assert main(["trace", "--data", str(prompts), "--out", str(out), "--num", "12",
                 "--output-lens-from", str(answers)]) == 0
    trace = read_trace(out)
    assert {r.output_tokens for r in trace} <= {1, 30}
    assert {r.id for r in trace} == {f"sharegpt:c{i}" for i in range(6)}

    with pytest.raises(SystemExit):
        main(["trace", "--workload", "chat", "--output-len", "5", "--out", str(out)])
    assert "go with --data" in capsys.readouterr().err


def test_alise_trace_reads_the_standard_alpaca_and_sharegpt_json_files(tmp_path, capsys):
    import json

    from alise.cli.main import main

    alpaca = tmp_path / "alpaca_data.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, walk."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}], indent=4))
    sharegpt = tmp_path / "ShareGPT_V3_unfiltered_cleaned_split.json"
    sharegpt.write_text(json.dumps([
        {"id": "a1", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                       {"from": "gpt", "value": "Paris is the capital of France."},
                                       {"from": "human", "value": "And of Spain?"}]},
        {"id": "a2", "conversations": [{"from": "human", "value": "a question left unanswered"}]}]))
    out = tmp_path / "t.jsonl"
    assert main(["trace", "--data", str(alpaca), "--out", str(out), "--num", "2"]) == 0
    prompts = {r.prompt: r.output_tokens for r in read_trace(out)}
    assert prompts.keys() == {"Give three tips for staying healthy.", "Translate to French.\n\nGood morning"}
    assert main(["trace", "--data", str(sharegpt), "--out", str(out), "--num", "2"]) == 0
    trace = read_trace(out)
    assert {r.prompt for r in trace} == {"What is the capital of France?"}  # the first exchange only
    assert trace[0].output_tokens == 7  # "paris is the capital of france." in WordPiece
    assert "1 record without an output left out" in capsys.readouterr().out
