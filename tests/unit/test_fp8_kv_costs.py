"""What fp8 pages change in the costs the scheduler and the simulator price with (no torch).

A token's K/V bytes halve: the latency model's per-context-token cost (a decode step reads
each cached token once) halves and nothing else moves; the simulator's workers get twice the
blocks of half the bytes at the same memory, and a memory-bound burst finishes sooner.
"""

from __future__ import annotations

import dataclasses

import pytest

from alise.core.config import SchedulingConfig
from alise.core.latency_model import LatencyModel
from alise.tools.sim.simulator import SimConfig, simulate
from alise.tools.sim.sweep import capacity_bound
from alise.tools.trace import TraceRequest

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
