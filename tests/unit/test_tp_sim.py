"""The simulator's price of a tensor-parallel worker's step (alise.tools.sim.profiles): a
one-device profile split N ways plus the step's all-reduces."""

from __future__ import annotations

import argparse

import pytest

from alise.core.latency_model import LatencyModel
from alise.tools.sim.profiles import AllReduceCost, tensor_parallel_from_args, tensor_parallel_profile

ONE_DEVICE = LatencyModel(c0_s=20e-3, c_seq_s=1e-5, c_ctx_s=1e-7, c_pre_s=1e-4, c_pre2_s=1e-9, c_mixed_s=1e-3,
                          name="llama-2-70b-h100", meta=dict(kind="measured", model="llama-2-70b"))


def test_tp2_step_is_the_split_work_plus_two_all_reduces_a_layer() -> None:
    cost = AllReduceCost(latency_s=10e-6, bytes_per_s=100e9)
    tp2 = tensor_parallel_profile(ONE_DEVICE, tensor_parallel_size=2, num_layers=80, hidden_size=8192,
                                  num_kv_heads=8, activation_bytes=2, allreduce=cost)
    # A decode step of 64 sequences at 512 tokens: half the weights and KV, 161 all-reduces of
    # 64 x 8192 x 2 bytes (latency + bytes / bandwidth each).
    reduces = 161 * (10e-6 + 64 * 8192 * 2 / 100e9)
    expect = 20e-3 / 2 + 64 * 1e-5 + 64 * 512 * 1e-7 / 2 + reduces
    assert tp2.forward_s(64, 64 * 512) == pytest.approx(expect)
    assert tp2.c_mixed_s == ONE_DEVICE.c_mixed_s and tp2.name == "llama-2-70b-h100-tp2"
    assert "tensor-parallel estimate" in tp2.meta["kind"]
    # Fewer KV heads than ranks: each rank keeps a whole head (1 of 8 at 16 ranks).
    tp16 = tensor_parallel_profile(ONE_DEVICE, tensor_parallel_size=16, num_layers=80, hidden_size=8192,
                                   num_kv_heads=8, activation_bytes=2, allreduce=cost)
    assert tp16.c_ctx_s == pytest.approx(ONE_DEVICE.c_ctx_s / 8)


def test_sim_flags_price_tp_workers_from_the_profile_model() -> None:
    args = argparse.Namespace(tensor_parallel_size=2, tp_model=None, allreduce_us=10.0, allreduce_gb_s=100.0)
    tp2 = tensor_parallel_from_args(ONE_DEVICE, args)
    assert tp2.meta["tensor_parallel"]["num_layers"] == 80 and tp2.c0_s > ONE_DEVICE.c0_s / 2
    measured_at_tp = LatencyModel(name="x", meta=dict(tensor_parallel_size=2, model="llama-2-70b"))
    assert tensor_parallel_from_args(measured_at_tp, args) is measured_at_tp
    with pytest.raises(ValueError, match="needs --tp-model"):
        tensor_parallel_from_args(LatencyModel(name="y"), args)
