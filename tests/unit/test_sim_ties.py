"""Simulator: requests that arrive at the same moment queue in the trace's order."""

from __future__ import annotations

from alise.core.config import SchedulingConfig
from alise.core.latency_model import LatencyModel
from alise.tools.sim.simulator import SimConfig, job_ids_by_index, simulate
from alise.tools.trace import TraceRequest

LATENCY = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-4, name="test")


def test_a_burst_is_served_first_come_first_served_in_the_trace_order():
    """Twelve requests at time 0, one sequence at a time under fcfs: each starts after the one
    before it in the trace (the core breaks equal arrivals by job id, so "r10" and "r11" must
    not sort before "r2")."""
    trace = [TraceRequest(f"q{i}", "x", 8, 5, 0.0) for i in range(12)]
    config = SimConfig(kv_tokens=2048, max_num_seqs=1, max_model_len=256, max_tokens=256,
                       scheduling=SchedulingConfig(policy="fcfs"))
    result = simulate(trace, LATENCY, config)
    by_id = {r.job_id: r for r in result.records}
    first = [by_id[job_id].first_token_s for job_id in job_ids_by_index(len(trace))]
    assert first == sorted(first) and len(set(first)) == len(first)


def test_job_ids_sort_as_strings_in_index_order():
    for n in (1, 9, 10, 11, 100, 1001):
        ids = job_ids_by_index(n)
        assert ids == sorted(ids) and len(set(ids)) == n
    assert job_ids_by_index(3) == ["r0", "r1", "r2"]  # ten or fewer: the ids as before
