"""Tensor-parallel ranks on the CPU for tests: gloo, one process per rank (torch.multiprocessing's
spawn, so nothing of the test process is forked), joined through a file store in a temp dir.

A rank function runs in every rank as ``fn(rank, world_size, store_path, *args)`` and writes what
the test compares (rank 0's logits, say) under a directory the test passed; a rank that raises
fails the test with its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from familycases import BLOCK_SIZE, NUM_BLOCKS, make_sequences, run_schedule


def spawn_ranks(fn, world_size: int, tmp_path: Path, *args) -> None:
    """Runs ``fn`` in ``world_size`` fresh processes and waits for them (raises if one fails)."""
    store = tmp_path / "tp-store"
    mp.spawn(_rank_main, args=(fn, world_size, str(store), *args), nprocs=world_size, join=True)


def _rank_main(rank: int, fn, world_size: int, store: str, *args) -> None:
    """``fn`` in one rank, then, once every rank is done, its process group destroyed and the
    process ended at once, as the worker's ranks end (``tp_ranks.run_follower``): a rank that
    left its gloo connections to the interpreter's exit, or closed them while another rank still
    read, could die of SIGABRT (std::terminate: "terminate called without an active exception")
    after its work, and nothing of the interpreter's teardown is needed once the group is gone."""
    fn(rank, world_size, store, *args)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears its connections down while another still reads
        torch.distributed.destroy_process_group()
    exit_now(0)


def exit_now(status: int) -> None:
    """Ends this process with ``status`` without the interpreter's teardown (what a rank had to
    say is flushed first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


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


def engine_plans() -> list:
    """Plans through a tiny model's engine: two prompts in chunks beside decodes, then each KV
    action on a paused job (swap to host, int8, drop for recompute, int4) and its resume; greedy, so
    the tokens follow the logits. A random sampler's job (seeded) runs beside them."""
    from alise.core.commands import Admit, KvAction, Pause, Resume, StepPlan
    from alise.core.sampling import SamplingParams

    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=40, temperature=1.0, seed=7, ignore_eos=True)
    prompts = {"a": list(range(1000, 1013)), "b": list(range(2000, 2006)), "c": list(range(3000, 3009))}
    # c comes first and takes block 0, which pads the decode block tables: the torch attention
    # reads it masked, and a job's int8 codes there, read as floats, may be NaN (NaN x 0 is NaN).
    # a asks for logprobs: rank 0 samples, so only its report carries them.
    with_logprobs = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=3)
    plans = [StepPlan(0, [Admit("c", prompts["c"], seeded), Admit("a", prompts["a"], with_logprobs),
                          Admit("b", prompts["b"], greedy)], run_step=True, chunks={"a": 8, "b": 6, "c": 9})]
    plans.append(StepPlan(1, run_step=True, chunks={"a": 5}))
    # A dropped job recomputes all its tokens on resume: b's 6, its token of step 0 and one for
    # each step it ran (1, 2, 5-10) make 15.
    actions = [("b", KvAction.SWAP_TO_HOST, {}), ("a", KvAction.QUANTIZE_INT8, {}), ("b", KvAction.DROP, {"b": 15}),
               ("a", KvAction.QUANTIZE_INT4, {})]
    step = 2
    for job_id, action, chunks in actions:
        plans += [StepPlan(step, run_step=True), StepPlan(step + 1, [Pause(job_id, action)], run_step=True),
                  StepPlan(step + 2, run_step=True), StepPlan(step + 3, [Resume(job_id)], run_step=True,
                                                              chunks=chunks)]
        step += 4
    plans += [StepPlan(step + i, run_step=True) for i in range(3)]
    return plans


def engine_config(model_dir: str, tensor_parallel_size: int):
    from alise.worker.config import WorkerConfig

    return WorkerConfig(model=model_dir, num_device_blocks=48, num_host_blocks=16, block_size=4, max_num_seqs=8,
                        max_num_batched_tokens=64, tensor_parallel_size=tensor_parallel_size)


def record_logits(runner) -> list:
    """Every step's logits of ``runner`` (float32, on the host), appended as steps run."""
    seen = []
    execute = runner.execute

    def recording(chunks, **kwargs):
        logits = execute(chunks, **kwargs)
        seen.append(logits.detach().cpu().clone())
        return logits

    runner.execute = recording
    return seen


def engine_rank(rank: int, world_size: int, store: str, model_dir: str, out: str) -> None:
    """Rank 0 runs :func:`engine_plans` through the driver engine (the others follow) and saves
    the outputs and each step's logits to ``{out}/engine.pt``."""
    from alise.worker.model.tp_serving import load_rank, make_engine
    from alise.worker.tp_engine import follow

    config = engine_config(model_dir, world_size)
    parts = load_rank(config, rank, store)

    def failed(reason: str) -> None:
        raise AssertionError(reason)

    engine = make_engine(parts, config, on_failure=failed)
    if rank:
        follow(engine, parts.tp.broadcast)
        return
    logits = record_logits(parts.runner)
    reports = [engine.run(plan) for plan in engine_plans()]
    engine.stop_followers()
    torch.save(dict(reports=reports, logits=logits, num_blocks=engine.allocator.num_blocks), f"{out}/engine.pt")


def profiled_worker(_: int, model_dir: str, out: str) -> None:
    """A TP=2 worker's start-up with ``profile_latency`` (this process rank 0, its rank 1 a child):
    saves the fitted profile's JSON and the hello's block count to ``out``."""
    import dataclasses as dc
    import json

    from alise.worker.model.tp_serving import load_tp_served_model

    config = dc.replace(engine_config(model_dir, 2), profile_latency=True, max_model_len=256, num_device_blocks=512)
    served = load_tp_served_model(config)
    served.ranks.stop()
    Path(out).write_text(json.dumps(dict(profile=served.latency_model.to_json(),
                                         num_blocks=served.engine.allocator.num_blocks)))
