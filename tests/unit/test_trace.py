"""Trace builder: arrival rates and burstiness, lengths, file round trip, rescaling."""

from __future__ import annotations

import collections
import json
import os
import statistics
from itertools import pairwise

import pytest

from alise.tools.trace import TraceRequest, arrival_times, build_trace, describe, read_trace, rescale, write_trace

PAIRS = [(f"p{i}", "word " * (i % 7 + 1), "tok " * (i % 13)) for i in range(50)]


def count_words(texts):
    return [len(t.split()) for t in texts]


def gaps(times):
    return [b - a for a, b in pairwise([0.0, *times])]


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


# -- conversations, the release rule, shared prefixes ------------------------------------------

def conversation_trace():
    """Two conversations (c0: 3 turns, c1: 2) and one lone request, as `alise trace` writes them."""
    return [TraceRequest("a", "A", 1, 10, 0.0, "c0", 0),
            TraceRequest("x", "X", 1, 10, 0.5),
            TraceRequest("p", "P", 1, 10, 1.0, "c1", 0),
            TraceRequest("b", "A b", 2, 10, 2.0, "c0", 1, think_time_s=2.0),
            TraceRequest("q", "P q", 2, 10, 4.0, "c1", 1, think_time_s=3.0),
            TraceRequest("c", "A b c", 3, 10, 5.0, "c0", 2, think_time_s=3.0)]


def test_a_later_turn_is_released_its_think_time_after_the_turn_before_ends():
    from alise.tools.trace import Releases

    trace = conversation_trace()
    rel = Releases(trace)
    assert rel.next_s() == 0.0 and rel.pop_due(0.9) == [(0, 0.0), (1, 0.5)]
    assert rel.pop_due(5.0) == [(2, 1.0)]  # "b" and "q" wait on their turns before, not the clock
    assert rel.next_s() is None and rel and rel.awaited() == [0, 2]
    rel.finished(1, 3.0)  # no successor: nothing changes
    rel.finished(0, 7.5)
    assert rel.next_s() == 9.5 and rel.pop_due(9.0) == [] and rel.pop_due(9.5) == [(3, 9.5)]
    rel.finished(2, 8.0)
    rel.finished(3, 10.0)
    assert rel.pop_due(100.0) == [(4, 11.0), (5, 13.0)]
    assert not rel and rel.awaited() == []


def test_a_trace_without_conversations_is_released_in_arrival_order():
    from alise.tools.trace import Releases

    trace = build_trace(PAIRS, num=40, rate=5.0, seed=2, count_tokens=count_words)
    rel = Releases(trace)
    released = rel.pop_due(float("inf"))
    assert released == [(i, r.arrival_s) for i, r in enumerate(trace)] and not rel


def test_conversation_fields_round_trip_and_single_turn_files_do_not_carry_them(tmp_path):
    trace = conversation_trace()
    path = tmp_path / "c.jsonl"
    write_trace(trace, path)
    assert read_trace(path) == trace
    lines = path.read_text().splitlines()
    assert '"conversation_id"' not in lines[1] and '"think_time_s": 2.0' in lines[3]
    write_trace(build_trace(PAIRS, num=3, rate=1.0, count_tokens=count_words), path)
    assert all(set(json.loads(line)) == {"id", "prompt", "prompt_tokens", "output_tokens",
                                                       "arrival_s"} for line in path.read_text().splitlines())


def test_read_trace_refuses_a_conversation_with_a_missing_turn(tmp_path):
    trace = [r for r in conversation_trace() if r.id != "b"]
    path = tmp_path / "gap.jsonl"
    write_trace(trace, path)
    with pytest.raises(ValueError, match=r"conversation 'c0' has turns \[0, 2\]"):
        read_trace(path)


def test_rescale_moves_conversation_starts_and_keeps_think_times():
    from alise.tools.trace import mean_rate, previous_outputs

    trace = conversation_trace()
    assert mean_rate(trace) == pytest.approx(6 / 1.0)  # six requests over the last start at 1 s
    slow = rescale(trace, 1.0)  # starts 6x later, think times kept: "b" now comes before "x"
    assert [r.id for r in slow] == [r.id for r in trace]  # the same order: estimates by index hold
    assert slow[3].arrival_s == pytest.approx(2.0) and slow[1].arrival_s == pytest.approx(3.0)
    fast = rescale(trace, 12.0)
    by_id = {r.id: r for r in fast}
    assert by_id["p"].arrival_s == pytest.approx(0.5) and by_id["x"].arrival_s == pytest.approx(0.25)
    assert by_id["b"].arrival_s == pytest.approx(2.0) and by_id["c"].arrival_s == pytest.approx(5.0)
    assert by_id["q"].arrival_s == pytest.approx(3.5)
    assert previous_outputs(trace) == [[], [], [], [10], [10], [10, 10]]


ANSWERS = {
    "terse": [(f"i{i}", f"question {i} about thing {i}", "yes " * (1 + i % 3)) for i in range(40)],
    "wordy": [(f"i{i}", f"question {i} about thing {i}", "well " * (20 + i)) for i in range(40)],
}


def split_words(texts):
    return [t.split() for t in texts]


def test_conversations_carry_the_history_real_answers_and_think_times():
    from alise.tools.conversations import TurnsDistribution, build_conversations, render_chat
    from alise.tools.trace import check_conversations, conversations

    trace = build_conversations(ANSWERS, num=60, rate=2.0, turns=TurnsDistribution.parse("2-4"),
                                think_time_s=5.0, seed=1, max_context_tokens=150, tokenize=split_words)
    assert len(trace) == 60 and [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    check_conversations(trace)
    texts = {pid: q for pid, q, _ in ANSWERS["terse"]}
    for turns in conversations(trace).values():
        reqs = [trace[i] for i in turns]
        # one generator answers the whole conversation
        generator = "wordy" if reqs[0].output_tokens >= 20 else "terse"
        answer = {pid: a for pid, _, a in ANSWERS[generator]}
        assert len(reqs) <= 4 and reqs[0].think_time_s == 0
        for k, r in enumerate(reqs):
            assert r.query == texts[r.id] and r.output_tokens == len(answer[r.id].split())
            history = [(x.query, answer[x.id]) for x in reqs[:k]]
            assert r.prompt == render_chat("", history, r.query)
            assert r.prompt_tokens == len(r.prompt.split()) and r.prompt_tokens + r.output_tokens <= 150
            if k:
                assert r.prompt.startswith(reqs[k - 1].prompt + answer[reqs[k - 1].id])
                assert r.arrival_s == pytest.approx(reqs[k - 1].arrival_s + r.think_time_s, abs=2e-6)
    # user turns are drawn without replacement until the 40 instructions are used up
    counts = collections.Counter(r.id for r in trace)
    assert max(counts.values()) <= 2 and len(counts) >= 30
    again = build_conversations(ANSWERS, num=60, rate=2.0, turns=TurnsDistribution.parse("2-4"),
                                think_time_s=5.0, seed=1, max_context_tokens=150, tokenize=split_words)
    assert again == trace
    lone = build_conversations({"terse": ANSWERS["terse"]}, num=10, rate=1.0, think_time_s=0.0,
                               turns=TurnsDistribution.parse("3"), tokenize=split_words)
    assert {r.think_time_s for r in lone} == {0.0} and max(r.turn for r in lone) == 2


def test_turns_distributions_parse_sample_and_refuse_nonsense():
    import random

    from alise.tools.conversations import TurnsDistribution

    rng = random.Random(0)
    assert {TurnsDistribution.parse("3").sample(rng) for _ in range(20)} == {3}
    assert {TurnsDistribution.parse("2-4").sample(rng) for _ in range(200)} == {2, 3, 4}
    geo = [TurnsDistribution.parse("geom:4").sample(rng) for _ in range(20_000)]
    assert min(geo) == 1 and statistics.fmean(geo) == pytest.approx(4.0, rel=0.05)
    for bad in ("0", "5-2", "geom:0.5", "many"):
        with pytest.raises(ValueError, match="turns must be"):
            TurnsDistribution.parse(bad)


def brute_force_share(seqs):
    return [max((len(os.path.commonprefix([list(s), list(t)])) for t in seqs[:i]), default=0)
            for i, s in enumerate(seqs)]


def test_prefix_share_is_the_longest_prefix_any_earlier_prompt_had():
    import random

    from alise.tools.conversations import prefix_share

    share = prefix_share([[1, 2, 3], [1, 2, 4], [9], [1, 2, 3, 5], [1, 2, 3]])
    assert share.shared_tokens == [0, 2, 0, 3, 3]
    assert share.fraction == pytest.approx(8 / 14) and share.mean_per_request == pytest.approx(
        (0 + 2 / 3 + 0 + 3 / 4 + 1) / 5)
    rng = random.Random(3)
    seqs = [[rng.randint(0, 2) for _ in range(rng.randint(0, 8))] for _ in range(300)]
    assert prefix_share(seqs).shared_tokens == brute_force_share(seqs)


def test_a_system_prompt_is_cut_from_real_text_and_prepended_to_every_request(tmp_path):
    from alise.tools.conversations import prefix_share, system_prompt_text, with_system_prompt

    source = tmp_path / "prompts.jsonl.gz"
    _write_jsonl_gz(source, [{"id": i, "prompt": f"first second third prompt{i}"} for i in range(10)])
    text = system_prompt_text(9, split_words, source)
    assert text == "first second third prompt0 first second third prompt1 first"
    with pytest.raises(ValueError, match="fewer than 100 tokens"):
        system_prompt_text(100, split_words, source)
    trace = with_system_prompt(build_trace(PAIRS, num=5, rate=1.0, count_tokens=count_words), text, split_words)
    assert all(r.prompt.startswith(f"<|system|>\n{text}\n<|user|>\n") and r.query in r.prompt for r in trace)
    assert all(r.prompt_tokens == len(r.prompt.split()) for r in trace)
    assert prefix_share(split_words([r.prompt for r in trace])).shared_tokens[1:] >= [11] * 4


def _alpaca_eval_dir(tmp_path):
    data = tmp_path / "data"
    (data / "alpaca_eval").mkdir(parents=True)
    (data / "sharegpt").mkdir()
    for model, answers in ANSWERS.items():
        _write_jsonl_gz(data / "alpaca_eval" / f"{model}.jsonl.gz",
                        [{"id": int(pid[1:]), "instruction": q, "output": a, "generator": model}
                         for pid, q, a in answers])
    _write_jsonl_gz(data / "sharegpt" / "sharegpt_v3_filtered_1000.jsonl.gz",
                    [{"id": f"s{i}", "prompt": f"You are a careful assistant number {i}."} for i in range(50)])
    return data


def test_alise_trace_multiturn_writes_conversations_and_prints_the_prefix_share(tmp_path, capsys, monkeypatch):
    from alise.cli.main import main

    monkeypatch.setenv("ALISE_DATA_DIR", str(_alpaca_eval_dir(tmp_path)))
    out = tmp_path / "mt.jsonl"
    assert main(["trace", "--workload", "multiturn", "--out", str(out), "--num", "30", "--turns", "3",
                 "--think-time-s", "2", "--system-prompt-tokens", "40", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    trace = read_trace(out)
    assert len(trace) == 30 and {r.turn for r in trace} == {0, 1, 2}
    assert "real answers, one generator per conversation among terse, wordy" in printed
    assert "prefix share" in printed and "conversations, 3.00 turns on average" in printed
    share = float(printed.split("prefix share ")[1].split("%")[0])
    assert 50 < share < 100  # the system prompt and every earlier turn are shared
    assert main(["trace", "--workload", "multiturn", "--answers-from", "wordy", "--out", str(out),
                 "--num", "8"]) == 0
    assert "real answers of wordy" in capsys.readouterr().out
    assert min(r.output_tokens for r in read_trace(out)) >= 20

    for argv, message in ((["--workload", "chat", "--turns", "3"], "--turns go with --workload multiturn"),
                          (["--workload", "multiturn", "--answers-from", "gpt9"], "no AlpacaEval outputs of gpt9"),
                          (["--workload", "multiturn", "--turns", "0"], "turns must be")):
        with pytest.raises(SystemExit) as exc:
            main(["trace", *argv, "--out", str(tmp_path / "no.jsonl")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_the_simulator_sends_a_later_turn_its_think_time_after_the_answer_before():
    from alise.core.config import SchedulingConfig
    from alise.core.job import LengthEstimate
    from alise.core.latency_model import LatencyModel
    from alise.tools.sim.simulator import SimConfig, simulate

    latency = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-4, name="test")
    trace = conversation_trace()
    estimates = {i: LengthEstimate(10, 10, 20) for i in range(len(trace))}
    config = SimConfig(kv_tokens=2048, max_model_len=512, max_tokens=512,
                       scheduling=SchedulingConfig(policy="fcfs"))
    result = simulate(trace, latency, config, estimates=estimates)
    rec = {r.job_id: r for r in result.records}
    for before, after in ((0, 3), (3, 5), (2, 4)):
        gap = rec[f"r{after}"].arrival_s - rec[f"r{before}"].finish_s
        assert gap == pytest.approx(trace[after].think_time_s)
    assert rec["r3"].arrival_s > trace[3].arrival_s  # later than the file's earliest time
    assert [rec[f"r{i}"].arrival_s for i in (0, 1, 2)] == [0.0, 0.5, 1.0]


def test_folds_keep_conversations_and_their_instructions_together():
    from alise.tools.sim.context_estimates import fold_groups

    trace = [TraceRequest("i1", "", 1, 1, 0.0, "c0", 0), TraceRequest("i2", "", 1, 1, 1.0, "c0", 1),
             TraceRequest("i3", "", 1, 1, 2.0, "c1", 0), TraceRequest("i2", "", 1, 1, 3.0, "c2", 0),
             TraceRequest("i4", "", 1, 1, 4.0, "c3", 0), TraceRequest("i5", "", 1, 1, 5.0)]
    groups = fold_groups(trace)
    # c0 and c2 share instruction i2: one group; c1, c3 and the lone request stand alone
    assert groups[0] == groups[1] == groups[3] and len({groups[0], groups[2], groups[4], groups[5]}) == 4


def test_earlier_answers_sharpen_cross_fitted_estimates_of_later_turns(monkeypatch, tmp_path):
    from alise.tools.conversations import TurnsDistribution, build_conversations
    from alise.tools.sim.context_estimates import conversation_cross_fit, metrics

    monkeypatch.setenv("ALISE_DATA_DIR", str(tmp_path))  # no AlpacaEval answers to warm up from
    answers = {"terse": [(f"i{i}", f"question {i} about thing {i % 7}", "yes " * (1 + i % 3)) for i in range(150)],
               "wordy": [(f"i{i}", f"question {i} about thing {i % 7}", "well " * (20 + i % 40)) for i in range(150)]}
    # 120 requests of 150 instructions: none repeats, so folds are the conversations
    trace = build_conversations(answers, num=120, rate=2.0, turns=TurnsDistribution.parse("3"),
                                think_time_s=1.0, seed=2, max_context_tokens=400, tokenize=split_words)
    fit = conversation_cross_fit(trace, text="query", num_folds=3)
    later = [i for i, r in enumerate(trace) if r.turn > 0]
    alone, context = metrics(fit.plain, trace, later), metrics(fit.with_context, trace, later)
    # the instruction says nothing of the generator; the earlier answers do
    assert context["kendall_tau"] > alone["kendall_tau"] + 0.2 and context["mae"] < alone["mae"]
    first = [i for i, r in enumerate(trace) if r.turn == 0]
    assert [fit.plain[i].p50 for i in first] == [fit.with_context[i].p50 for i in first]
    assert len(fit.prior_turns) == 3 and all(0 < k < 5 for k in fit.prior_turns)


def test_alise_bench_request_rate_moves_conversation_starts_and_keeps_think_times(tmp_path):
    import argparse

    from alise.tools.bench.cli import _requests

    path = tmp_path / "c.jsonl"
    write_trace(conversation_trace(), path)
    args = argparse.Namespace(trace=str(path), num=None, rate=None, request_rate=float("inf"),
                              burstiness=1.0, seed=0)
    sent = _requests(args)
    assert [r.id for r in sent] == [r.id for r in read_trace(path)]
    by_id = {r.id: r for r in sent}
    assert {by_id[i].arrival_s for i in "axp"} == {0.0}
    assert by_id["b"].arrival_s == 2.0 and by_id["c"].arrival_s == 5.0 and by_id["q"].arrival_s == 3.0
    assert by_id["q"].conversation_id == "c1" and by_id["q"].think_time_s == 3.0
