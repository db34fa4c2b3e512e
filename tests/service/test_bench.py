"""The open-loop bench client against a real in-process cluster (tiny model, loopback gRPC)."""

from __future__ import annotations

import math

from alise.bench.cluster import run_on_cluster
from alise.bench.openloop import format_summary, summarize
from alise.core.job import LengthEstimate
from alise.sim.trace import TraceRequest


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
