"""What fp8 pages change in the costs the scheduler and the simulator price with (no torch).

A token's K/V bytes halve: the latency model's per-context-token cost (a decode step reads
each cached token once) halves and nothing else moves; the simulator's workers get twice the
blocks of half the bytes at the same memory, and a memory-bound burst finishes sooner. A
worker's hello says its pages' dtype, and the KV planner plans no int8/int4 move on fp8 pages
(the worker refuses them: see alise.worker.model.kv_offload).
"""

from __future__ import annotations

import dataclasses

import pytest

from alise.core.blocks import WorkerCapacity, place_blocks
from alise.core.config import SchedulingConfig
from alise.core.job import Job, JobStatus, KvPlace
from alise.core.kv_places import PLACES
from alise.core.latency_model import LatencyModel
from alise.core.memory_planner import AdaptivePlanner, KvCostModel
from alise.tools.sim.simulator import SimConfig, simulate
from alise.tools.sim.sweep import capacity_bound
from alise.tools.trace import TraceRequest
from corekit import LATENCY, make_job

PROFILE = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=2e-6, c_pre_s=1e-4, c_pre2_s=1e-9, name="test",
                       meta=dict(kv_bytes_per_token=800_000))


def test_kv_bytes_ratio_halves_the_per_context_token_cost_only() -> None:
    fp8 = PROFILE.with_kv_bytes_ratio(0.5)
    assert fp8.c_ctx_s == PROFILE.c_ctx_s / 2
    for name in ("c0_s", "c_seq_s", "c_pre_s", "c_pre2_s", "correction", "c_cycle_s"):
        assert getattr(fp8, name) == getattr(PROFILE, name)
    assert fp8.meta["kv_bytes_ratio"] == 0.5 and fp8.with_kv_bytes_ratio(0.5).meta["kv_bytes_ratio"] == 0.25
    assert PROFILE.c_ctx_s == 2e-6 and "kv_bytes_ratio" not in PROFILE.meta  # the original is untouched
    # 64 sequences at context 1,000: c0 + 64 c_seq + 64,000 c_ctx = 10 + 6.4 + 128 ms, then 64 ms of KV.
    assert PROFILE.step_s(64, 64_000) == pytest.approx(0.1444)
    assert fp8.step_s(64, 64_000) == pytest.approx(0.0804)
    with pytest.raises(ValueError, match="ratio must be > 0"):
        PROFILE.with_kv_bytes_ratio(0)


def test_sim_workers_with_fp8_pages_have_twice_the_blocks_of_half_the_bytes() -> None:
    auto = SimConfig(kv_tokens=15_000, block_bytes=13 << 20)
    fp8 = dataclasses.replace(auto, kv_cache_dtype="fp8_e4m3")
    assert (auto.num_device_blocks, fp8.num_device_blocks) == (937, 1875)
    assert fp8.kv_room_tokens == 30_000
    assert fp8.capacity("w").block_bytes * 2 == auto.capacity("w").block_bytes
    assert not fp8.capacity("w").can_quantize_kv and auto.capacity("w").can_quantize_kv
    assert fp8.kv_latency(PROFILE).c_ctx_s == PROFILE.c_ctx_s / 2
    assert auto.kv_latency(PROFILE) is PROFILE
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8_e4m3"):
        SimConfig(kv_cache_dtype="fp8_e5m2")


def test_a_memory_bound_burst_finishes_sooner_on_fp8_pages() -> None:
    # 48 jobs of 100 + 200 tokens at once: 16 fit the 4,800 tokens of 16-bit pages, 32 the fp8 ones.
    burst = [TraceRequest(f"r{i}", "x", 100, 200, 0.0) for i in range(48)]
    auto = SimConfig(kv_tokens=4_800, max_num_seqs=64, max_model_len=512, max_tokens=512,
                     scheduling=SchedulingConfig(policy="fcfs"))
    fp8 = dataclasses.replace(auto, kv_cache_dtype="fp8_e4m3")
    times = {c.kv_cache_dtype: simulate(burst, PROFILE, c).makespan_s for c in (auto, fp8)}
    assert times["fp8_e4m3"] < 0.75 * times["auto"], times
    assert capacity_bound(burst, PROFILE, fp8) > 1.5 * capacity_bound(burst, PROFILE, auto)


def paused_job(job_id: str, cached: int) -> Job:
    job = make_job(job_id, cached)
    job.status, job.kv, job.num_computed_tokens = JobStatus.PAUSED, KvPlace.DEVICE, cached
    return job


def test_the_planner_never_quantizes_fp8_pages() -> None:
    # Two paused jobs of 64 tokens = 16 blocks of 4 each, 10 blocks left (test_memory_planner's
    # case): on 16-bit pages "soon" goes to int8 (9 blocks) and "late" to the host; on fp8 pages
    # no quantized place is planned (the worker would refuse it), and the moves still fit.
    planner = AdaptivePlanner(KvCostModel(LATENCY, block_bytes=1 << 20, swap_bytes_per_s=1e10,
                                          quantize_bytes_per_s=1e11), headroom_fraction=0.0)
    waits = {"soon": 0.0, "late": 10.0}
    for dtype, quantized in (("auto", True), ("fp8_e4m3", False)):
        capacity = WorkerCapacity("w0", 4, 64, 64, 2048, 8, 4096, block_bytes=1 << 20, kv_cache_dtype=dtype)
        jobs = [paused_job("soon", 64), paused_job("late", 64)]
        targets = {m.job.job_id: m.target for m in planner.plan(jobs, waits, capacity, 10, 64)}
        assert any(PLACES[t].bits < 16 for t in targets.values()) == quantized, targets
        after = [targets.get(j.job_id, j.kv) for j in jobs]
        assert sum(place_blocks(p, 64, 4) for p in after if PLACES[p].on_device) <= 10


def test_the_hello_says_the_pages_dtype() -> None:
    from alise.common.wire import WireError, capacity_from_hello
    from alise.v1 import worker_pb2

    fields = dict(worker_id="w", block_size=16, num_device_blocks=10, max_model_len=64, max_num_seqs=2,
                  max_num_batched_tokens=4)
    assert capacity_from_hello(worker_pb2.WorkerHello(**fields)).can_quantize_kv
    fp8 = capacity_from_hello(worker_pb2.WorkerHello(**fields, kv_cache_dtype="fp8_e4m3"))
    assert fp8.kv_cache_dtype == "fp8_e4m3" and not fp8.can_quantize_kv
    with pytest.raises(WireError, match="kv_cache_dtype must be auto or fp8_e4m3, got 'int3'"):
        capacity_from_hello(worker_pb2.WorkerHello(**fields, kv_cache_dtype="int3"))
