"""Tensor-parallel ranks on the CPU for tests: gloo, one process per rank (torch.multiprocessing's
spawn, so nothing of the test process is forked), joined through a file store in a temp dir.

A rank function runs in every rank as ``fn(rank, world_size, store_path, *args)`` and writes what
the test compares (rank 0's logits, say) under a directory the test passed; a rank that raises
fails the test with its traceback.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.multiprocessing as mp

from familycases import BLOCK_SIZE, NUM_BLOCKS, make_sequences, run_schedule


def spawn_ranks(fn, world_size: int, tmp_path: Path, *args) -> None:
    """Runs ``fn`` in ``world_size`` fresh processes and waits for them (raises if one fails)."""
    store = tmp_path / "tp-store"
    mp.spawn(fn, args=(world_size, str(store), *args), nprocs=world_size, join=True)


def join(rank: int, world_size: int, store: str):
    from alise.worker.model.parallel import init_tensor_parallel

    return init_tensor_parallel(rank, world_size, store, "cpu", 0)


def make_runner(loaded, mode: str):
    """A runner over ``loaded`` as tests/unit/test_families makes them: ``eager`` (chunk by
    chunk, every position's logits) or ``graph-buffers`` (the graphs' static buffers, run eagerly)."""
    from alise.worker.kernels.triton_unified import UnifiedConfig
    from alise.worker.model.kernel_plan import KernelPlan
    from alise.worker.model.runner import ModelRunner

    runner = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=32)
    runner.min_batched_fresh = 0
    if mode == "graph-buffers":
        runner.ops.plan = KernelPlan(unified={16: UnifiedConfig(), 32: UnifiedConfig()})
        runner.decode_graphs = runner.make_decode_graphs(8)
        runner.mixed_graphs = runner.make_mixed_graphs()
    return runner


def schedule_logits(loaded, mode: str) -> dict:
    """The mixed schedule of tests/familycases.py through a runner of ``mode``."""
    tokens, tables = make_sequences(seed=1, vocab_size=loaded.config.vocab_size)
    return run_schedule(make_runner(loaded, mode), tokens, tables, every_position=mode == "eager")


def logits_rank(rank: int, world_size: int, store: str, models: dict[str, tuple[str, int | None]],
                modes: list[str], out: str) -> None:
    """Each model of ``models`` (name -> (directory, max_model_len)) loaded in this rank's
    slices, the schedule run in each mode; rank 0 saves ``{out}/{name}-{mode}.pt``, every rank
    its small parameters as ``{out}/{name}-params-{rank}.pt``."""
    from alise.worker.model.loader import load_model

    tp = join(rank, world_size, store)
    for name, (path, max_model_len) in models.items():
        loaded = load_model(path, max_model_len=max_model_len, tp=tp)
        small = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.numel() < 100_000}
        torch.save(small, f"{out}/{name}-params-{rank}.pt")
        for mode in modes:
            got = schedule_logits(loaded, mode)
            if rank == 0:
                torch.save(got, f"{out}/{name}-{mode}.pt")


def single_device(loaded):
    """``loaded`` as one device holds it (the reference a TP run must equal)."""
    return dataclasses.replace(loaded, tp=None)
