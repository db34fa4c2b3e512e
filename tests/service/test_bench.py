"""The open-loop bench client against a real in-process cluster (tiny model, loopback gRPC)."""

from __future__ import annotations

import math

import pytest

from alise.core.job import LengthEstimate
from alise.tools.bench.cluster import run_on_cluster
from alise.tools.bench.openloop import format_summary, summarize
from alise.tools.trace import TraceRequest


async def test_bench_replays_a_trace_and_records_each_request():
    requests = [TraceRequest(f"p{i}", f"Tell me about topic {i}", 6, n, 0.05 * i)
                for i, n in enumerate([3, 9, 5])]
    table = {r.prompt: LengthEstimate(r.output_tokens, r.output_tokens, 2 * r.output_tokens)
             for r in requests}
    stats: dict = {}
    results = await run_on_cluster(requests, policy="alise", model="tiny-llama",
                                   estimates_by_prompt=table, stats=stats,
                                   worker_overrides=dict(num_device_blocks=32, max_num_seqs=4))
    assert [r.error for r in results] == ["", "", ""]
    # ignore_eos and a common max_tokens cap: each ends at its trace length all the same
    assert [r.num_tokens for r in results] == [3, 9, 5]
    for r in results:
        assert 0 < r.ttft_s <= r.e2e_s and r.sent_s >= r.arrival_s - 0.01
        assert math.isclose(r.normalized_latency_s, r.e2e_s / r.num_tokens)
    assert "preemptions" in stats
    summary = summarize(results)
    assert summary["num_ok"] == 3 and summary["throughput_req_s"] > 0
    assert "normalized" in format_summary(summary)


def _result(i, ttft, tpot, tokens=5, error=""):
    from alise.tools.bench.openloop import RequestResult

    e2e = ttft + tpot * (tokens - 1)
    return RequestResult(i, f"r{i}", 4, tokens, 0.0, sent_s=0.1 * i, ttft_s=ttft, tpot_s=tpot, e2e_s=e2e,
                         normalized_latency_s=e2e / tokens, num_tokens=tokens, error=error,
                         itl_s=[tpot] * (tokens - 1))


def test_goodput_counts_requests_meeting_every_slo():
    from alise.tools.bench.metrics import parse_goodput

    results = [_result(0, 0.05, 0.01), _result(1, 0.20, 0.01), _result(2, 0.05, 0.08),
               _result(3, 0.01, 0.01, error="Overloaded")]
    slo = parse_goodput(["ttft:100", "tpot:50"])
    s = summarize(results, slo)
    assert s["num_ok"] == 3 and s["num_failed"] == 1 and s["num_good"] == 1
    assert math.isclose(s["goodput_req_s"], 1 / s["duration_s"])
    assert s["itl_s"]["p50"] == 0.01 and s["total_output_tokens"] == 15
    assert summarize(results, parse_goodput(["e2el:1000"]))["num_good"] == 3
    text = format_summary(s)
    assert "Request goodput (req/s)" in text and "Median ITL (ms)" in text and "P99 TTFT (ms)" in text
    for bad, fragment in ((["ttft"], "number"), (["speed:5"], "one of"), (["tpot:-1"], "> 0")):
        try:
            parse_goodput(bad)
        except ValueError as exc:
            assert fragment in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")


async def test_openai_and_grpc_backends_measure_the_same_requests(tiny_llama_dir):
    from cluster_fixtures import cluster

    from alise.http.config import HttpConfig
    from alise.http.server import start_http
    from alise.tools.bench.backends import GrpcBackend, OpenAIBackend
    from alise.tools.bench.openloop import run_bench

    requests = [TraceRequest(f"p{i}", f"Tell me about topic {i}", 6, n, 0.0) for i, n in enumerate([4, 7, 5, 6])]
    async with cluster(str(tiny_llama_dir), max_model_len=256,
                       worker_overrides=dict(max_model_len=256, block_size=8)) as c:
        http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=c.address))
        try:
            runs = {}
            # --max-tokens 6 caps the 7-token request, told through the oracle field (grpc,
            # openai) or through max_tokens (openai-chat)
            for backend, lengths in ((GrpcBackend(c.address), "oracle"),
                                     (OpenAIBackend(http.base_url), "oracle"),
                                     (OpenAIBackend(http.base_url, chat=True, token_ids=True), "max-tokens")):
                runs[backend.name] = await run_bench(requests, backend, max_concurrency=2, max_tokens=6,
                                                     request_prefix=backend.name, lengths=lengths)
        finally:
            await http.stop(0.5)
    for name, results in runs.items():
        assert [r.error for r in results] == [""] * 4, name
        assert [r.num_tokens for r in results] == [4, 6, 5, 6], name
        assert all(0 < r.ttft_s <= r.e2e_s for r in results), name
        # At most two in flight: every request is sent after all but one of those before it ended.
        spans = sorted((r.sent_s, r.sent_s + r.e2e_s) for r in results)
        for i, (start, _) in enumerate(spans):
            assert sum(1 for s, e in spans[:i] if e > start + 1e-3) <= 1, name
    assert [len(r.itl_s) for r in runs["grpc"]] == [n - 1 for n in (4, 6, 5, 6)]
    assert [len(r.itl_s) for r in runs["openai-chat"]] == [n - 1 for n in (4, 6, 5, 6)]


def test_max_tokens_caps_each_request_and_the_oracle_length_never_exceeds_it():
    from alise.tools.bench.openloop import request_send

    short, long = TraceRequest("a", "hi", 1, 30, 0.0), TraceRequest("b", "hi", 1, 900, 0.0)
    oracle = [request_send(r, "x", lengths="oracle", max_tokens=100, timeout_s=1.0) for r in (short, long)]
    # the common cap for all (the policy never sees a length), the target in the oracle field
    assert [(s.max_tokens, s.oracle_output_tokens) for s in oracle] == [(100, 30), (100, 100)]
    plain = [request_send(r, "x", lengths="max-tokens", max_tokens=100, timeout_s=1.0) for r in (short, long)]
    assert [(s.max_tokens, s.oracle_output_tokens) for s in plain] == [(30, 0), (100, 0)]


async def test_alise_bench_shows_progress_and_caps_lengths(tiny_llama_dir, tmp_path, capsys):
    import asyncio
    import json

    from cluster_fixtures import cluster

    from alise.cli.main import main
    from alise.tools.trace import write_trace

    trace = tmp_path / "t.jsonl"
    write_trace([TraceRequest(f"p{i}", f"Tell me about topic {i}", 6, n, 0.02 * i)
                 for i, n in enumerate([3, 9, 5])], trace)
    run = tmp_path / "run.json"
    async with cluster(str(tiny_llama_dir), max_model_len=256,
                       worker_overrides=dict(max_model_len=256, block_size=8)) as c:
        argv = ["bench", "--trace", str(trace), "--address", c.address, "--max-tokens", "6",
                "--json", str(run)]
        capsys.readouterr()  # what loading the model printed
        assert await asyncio.to_thread(main, argv) == 0
        piped = capsys.readouterr().err  # not a terminal: the run's end, on one line
        assert await asyncio.to_thread(main, argv + ["--progress"]) == 0
        live = capsys.readouterr().err
        assert await asyncio.to_thread(main, argv + ["--no-progress"]) == 0
        silent = capsys.readouterr().err
    assert piped.startswith("bench: 3 requests in ") and piped.endswith(", 0 failed\n")
    assert piped.count("\n") == 1
    assert "\r" not in piped and silent == ""
    assert live.startswith("\r\x1b[Kbench: 0/3 done, ") and "| 0.00 req/s | " in live
    assert "\r\x1b[Kbench: 3 requests in " in live
    saved = json.loads(run.read_text())
    assert saved["settings"]["max_tokens"] == 6
    assert [r["num_tokens"] for r in saved["requests"]] == [3, 6, 5]


def test_bench_compare_prints_runs_side_by_side_and_plots_cdfs(tmp_path, capsys):
    import json
    from dataclasses import asdict

    from alise.cli.main import main

    paths = []
    for label, scale in (("grpc", 1.0), ("openai", 1.3)):
        results = [_result(i, 0.05 * scale, 0.01 * scale) for i in range(4)]
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps(dict(settings=dict(label=label), summary=summarize(results),
                                        requests=[asdict(r) for r in results])))
        paths.append(str(path))
    png = tmp_path / "cdf.png"
    assert main(["bench", "--compare", *paths, "--png", str(png), "--goodput", "ttft:60"]) == 0
    out = capsys.readouterr().out
    header, goodput = out.splitlines()[0].split(), next(line for line in out.splitlines() if line.startswith("goodput"))
    assert header == ["grpc", "openai"] and float(goodput.split()[-2]) > 0 and float(goodput.split()[-1]) == 0
    assert png.stat().st_size > 10_000


def test_cdfs_mark_p50_and_p99_and_go_logarithmic_past_a_decade():
    from alise.tools.bench.metrics import pct
    from alise.tools.bench.plot import PANELS, cdf_figure, x_scale

    # TTFT from 2 ms to 2 s in both runs (three decades); TPOT within 20-30 ms
    runs = {name: [_result(i, 0.002 * (1.07 ** i) * scale, (0.020 + 0.0001 * i) * scale) for i in range(100)]
            for name, scale in (("fcfs", 1.2), ("alise", 1.0))}
    assert x_scale([[1.0, 9.9]]) == "linear" and x_scale([[0.0, 1.0, 10.1]]) == "log"
    assert x_scale([[]]) == "linear"
    fig = cdf_figure(runs)
    try:
        panels = dict(zip((key for key, _ in PANELS), fig.axes, strict=True))
        assert panels["ttft_s"].get_xscale() == "log" and panels["e2e_s"].get_xscale() == "log"
        assert panels["tpot_s"].get_xscale() == "linear"
        for key, ax in panels.items():
            marked = sorted(line.get_xdata()[0] for line in ax.get_lines()
                            if line.get_linestyle() in ("--", ":"))
            expected = sorted(pct(sorted(getattr(r, key) * 1000 for r in results), q)
                              for results in runs.values() for q in (0.5, 0.99)) if key != "itl_s" else None
            assert len(marked) == 4, key
            if expected:
                assert marked == pytest.approx(expected), key
            texts = [t.get_text() for t in ax.texts]
            assert texts.count("p50") == 2 and texts.count("p99") == 2, key
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            assert legend[0].startswith("fcfs: p50 ") and ", p99 " in legend[0], key
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


async def test_bench_sends_a_later_turn_its_think_time_after_the_answer_before():
    turns = [TraceRequest("a", "Tell me about rivers", 6, 12, 0.0, "c0", 0),
             TraceRequest("b", "Tell me about rivers ... and lakes?", 9, 4, 0.3, "c0", 1, think_time_s=0.3),
             TraceRequest("x", "Tell me about hills", 6, 3, 0.05)]
    results = await run_on_cluster(turns, policy="fcfs", model="tiny-llama",
                                   worker_overrides=dict(num_device_blocks=32, max_num_seqs=4))
    first, second, lone = results
    assert [r.error for r in results] == ["", "", ""] and [r.index for r in results] == [0, 1, 2]
    answered = first.sent_s + first.e2e_s
    # released by the first turn's end, not by the file's arrival time
    assert second.arrival_s == pytest.approx(answered + 0.3, abs=0.02) and second.arrival_s > 0.3
    assert second.sent_s >= second.arrival_s - 0.01 and lone.arrival_s == 0.05
