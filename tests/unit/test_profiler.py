"""The latency profiler: which points fit, what each point feeds, and a fitted profile on the CPU."""

from __future__ import annotations

import json

import pytest

from alise.core.latency_model import LatencyModel
from alise.worker.kernels.triton_attention import choose_num_splits
from alise.worker.model.loader import load_model
from alise.worker.model.profiler import (
    ProfileGrid,
    StepProfiler,
    plan_points,
    point_chunks,
    profile_runner,
    save_profile,
)
from alise.worker.model.runner import ModelRunner


def test_points_that_do_not_fit_are_skipped() -> None:
    grid = ProfileGrid(decode_batch_sizes=(1, 4), decode_contexts=(15, 100), prefill_lens=(32, 300),
                       mixed=((32, 2, 15),), multi=((2, 32, 1, 15), (3, 32, 1, 15), (2, 100, 1, 100)))
    points = plan_points(grid, num_blocks=20, block_size=16, max_model_len=256, max_num_seqs=3)
    # 4 decodes exceed max_num_seqs; context 100 needs 7 blocks (fits once); prompt 300 > max_model_len;
    # 3 prompts + 1 decode exceed max_num_seqs; 2 prompts of 100 + a decode at 100 need 21 blocks.
    assert points == [(0, 0, 1, 15, 1), (0, 0, 1, 100, 7), (1, 32, 0, 0, 2), (1, 32, 2, 15, 4),
                      (2, 32, 1, 15, 5)]


def test_point_chunks_use_disjoint_blocks_covering_each_sequence() -> None:
    chunks = point_chunks(20, 3, 31, block_size=16, vocab_size=100)
    assert [len(c.token_ids) for c in chunks] == [20, 1, 1, 1]
    assert [c.start_pos for c in chunks] == [0, 31, 31, 31]
    blocks = [b for c in chunks for b in c.block_table]
    assert len(blocks) == len(set(blocks)) == 2 + 3 * 2  # 20 tokens -> 2 blocks; 32 positions -> 2 each
    assert all(len(c.block_table) * 16 >= c.start_pos + len(c.token_ids) for c in chunks)
    assert all(0 <= t < 100 for c in chunks for t in c.token_ids)
    several = point_chunks(20, 1, 31, block_size=16, vocab_size=100, num_prompts=3)
    assert [(len(c.token_ids), c.start_pos) for c in several] == [(20, 0)] * 3 + [(1, 31)]
    assert len({b for c in several for b in c.block_table}) == 3 * 2 + 2
    assert len({tuple(c.token_ids) for c in several[:3]}) == 3  # distinct prompts


def test_step_time_is_the_median_of_the_timed_repeats() -> None:
    ticks = iter([0.0, 10.0, 10.5, 20.0, 23.0, 30.0, 31.0])  # warm-up (start only), then 0.5, 3, 1

    class Runner:
        def execute(self, chunks):
            import torch
            return torch.zeros(len(chunks), 5)

    profiler = StepProfiler(Runner(), repeats=3, clock=lambda: next(ticks))
    assert profiler.time_step([object()]) == 1.0


def test_profile_of_a_tiny_model_on_the_cpu_fits_and_round_trips(tiny_llama_dir, tmp_path) -> None:
    runner = ModelRunner(load_model(str(tiny_llama_dir)), num_blocks=16, block_size=8)
    grid = ProfileGrid(decode_batch_sizes=(1, 3), decode_contexts=(8, 30), prefill_lens=(5, 40),
                       mixed=((12, 2, 8),), multi=((2, 6, 1, 8),), repeats=1)
    profile = profile_runner(runner, grid=grid, command="pytest", engine="cpu test")
    assert profile.meta["num_samples"] == 8 and len(profile.meta["samples"]) == 8
    assert profile.meta["samples"][-1][:3] == [3, 2 * 6 + 9, [6, 6]]  # two prompts beside a decode
    assert profile.meta["device"] == "CPU" and profile.meta["engine"] == "cpu test"
    assert all(profile.step_s(n, ctx, pre) > 0 for n, ctx, pre, _ in profile.meta["samples"])
    assert not runner.kv_cache.key_cache.any()  # profiling leaves the cache as it found it
    path = tmp_path / "profile.json"
    save_profile(profile, str(path))
    loaded = LatencyModel.load(str(path))
    assert loaded.c0_s == pytest.approx(profile.c0_s) and loaded.meta["command"] == "pytest"
    assert json.loads(path.read_text())["name"] == profile.name


def test_split_count_targets_programs_per_sm_and_depends_only_on_shapes() -> None:
    assert choose_num_splits(1, 40, 132, programs_per_sm=1, max_splits=32) == 4
    assert choose_num_splits(1, 8, 132, programs_per_sm=2, max_splits=32) == 32
    assert choose_num_splits(1, 8, 132, programs_per_sm=2, max_splits=16) == 16
    assert choose_num_splits(64, 40, 132, programs_per_sm=1, max_splits=32) == 1
