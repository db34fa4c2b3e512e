"""One rank of a tensor-parallel worker: its slices of the model, its slice of every KV block,
its engine (rank 0's drives, the others follow: alise.worker.tp_engine).

Every rank holds the same number of KV blocks (the fewest any rank's memory holds), each block
its KV heads' share of ``block_size`` tokens, so block ids mean the same on every rank and the
hello's ``num_device_blocks`` is the whole replica's capacity; ``block_bytes`` is one rank's
share, what a swap of a block moves over each rank's own link, in parallel with the others.
Host blocks (``num_host_blocks``) are per rank too.

Rank 0 samples; the others take its tokens (:class:`TpExecutor`). The KV movers never let the
clock decide (:class:`LockstepKvMover`), so the engines stay equal. A latency profile
(``profile_latency``) is measured over the whole replica: every rank runs the profiler's steps,
so the fitted step times include the all-reduces.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from alise.core.commands import TokenLogprobs
from alise.modelinfo.source import resolve_model
from alise.worker.config import WorkerConfig
from alise.worker.engine import Feed, WorkerEngine
from alise.worker.kv_manager import KvManager
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.executor import ModelExecutor
from alise.worker.model.families import describe
from alise.worker.model.kv_offload import TorchKvMover
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.parallel import TensorParallel, init_tensor_parallel, rank_device
from alise.worker.model.runner import ModelRunner
from alise.worker.model.serving import (
    ServedModel,
    identity_of,
    kv_dtype,
    load_latency_profile,
    make_runner,
    size_kv_cache,
)
from alise.worker.model.tp_shard import HeadSplit, local_spec
from alise.worker.tp_engine import DriverEngine, follow

logger = logging.getLogger(__name__)


class TpExecutor(ModelExecutor):
    """A step on one rank: every rank runs the forward (its collectives meet the others'); rank
    0 samples and hands the tokens to the others."""

    def __init__(self, runner: ModelRunner, tp: TensorParallel, eos_token_id: int | None = None) -> None:
        super().__init__(runner, eos_token_id)
        self.tp = tp

    def execute(self, feeds: list[Feed]) -> tuple[list[int], float, list[TokenLogprobs | None] | None]:
        start = time.perf_counter()
        num_sampled = sum(1 for f in feeds if f.samples)
        logprobs = None  # the driver's report is the worker's: only it needs them
        if self.tp.is_driver:
            tokens, _, logprobs = super().execute(feeds)
        else:
            chunks = [SeqChunk(f.token_ids, f.start, f.seq.block_table, needs_logits=f.samples) for f in feeds]
            self.runner.execute(chunks)
            tokens = None
        tokens = self.tp.broadcast_tokens(tokens, num_sampled) if num_sampled else []
        return tokens, time.perf_counter() - start, logprobs


class _LockstepReady:
    """A copy in flight that only a wait completes: ``done`` never answers by the clock."""

    def __init__(self, ready) -> None:
        self.ready = ready

    def done(self) -> bool:
        return False

    def wait(self) -> None:
        self.ready.wait()


class LockstepKvMover(TorchKvMover):
    """:class:`TorchKvMover` whose swap-outs give their blocks back when an allocation waits for
    them, never when a rank happens to see the copy landed (the ranks' block ids would part)."""

    def copy_out(self, device_ids: list[int], host_ids: list[int]):
        ready = super().copy_out(device_ids, host_ids)
        return None if ready is None else _LockstepReady(ready)


@dataclass
class Rank:
    tp: TensorParallel
    loaded: LoadedModel
    runner: ModelRunner


def load_rank(config: WorkerConfig, rank: int, store_path: str) -> Rank:
    """Joins the replica, loads this rank's slices and sizes its KV cache as all ranks agree."""
    device = rank_device(config.device, rank)
    tp = init_tensor_parallel(rank, config.tensor_parallel_size, store_path, device, 0)
    loaded = load_model(config.model, device=device, dtype=config.dtype, seed=config.seed,
                        max_model_len=config.max_model_len, tp=tp)
    spec = local_spec(describe(loaded.config, loaded.max_model_len), rank, tp.world_size)
    itemsize = torch.empty((), dtype=kv_dtype(loaded, config)).element_size()
    block_bytes = 2 * spec.num_layers * config.block_size * spec.num_kv_heads * spec.head_dim * itemsize
    num_blocks = loaded.tp.min_over_ranks(size_kv_cache(loaded, config, block_bytes))
    return Rank(loaded.tp, loaded, make_runner(loaded, config, num_blocks))


def make_engine(rank: Rank, config: WorkerConfig, on_failure=None) -> WorkerEngine:
    runner = rank.runner
    mover = LockstepKvMover(runner.kv_cache, config.num_host_blocks)
    kv = KvManager(runner.num_blocks, config.num_host_blocks, runner.block_size, mover,
                   prefix_caching=config.enable_prefix_caching)
    executor = TpExecutor(runner, rank.tp, rank.loaded.eos_token_id)
    limits = dict(eos_token_id=rank.loaded.eos_token_id, max_model_len=rank.loaded.max_model_len)
    if rank.tp.is_driver:
        return DriverEngine(executor, kv, send=rank.tp.broadcast, on_failure=on_failure, **limits)
    return WorkerEngine(executor, kv, **limits)


def load_tp_served_model(config: WorkerConfig) -> ServedModel:
    """Starts ranks 1..N-1 and loads rank 0 here (blocking, as ``load_served_model``)."""
    from alise.worker.tp_ranks import RankGroup

    check_split(config)
    ranks = RankGroup(config, follow_rank)
    ranks.start()
    rank = load_rank(config, 0, ranks.store_path)
    engine = make_engine(rank, config, on_failure=ranks.fail)
    ranks.on_stop(engine.stop_followers)
    loaded, runner = rank.loaded, rank.runner
    identity = dataclasses.replace(identity_of(loaded, config.block_size, kv_dtype(loaded, config)),
                                   block_bytes=runner.kv_cache.num_bytes // runner.num_blocks)
    logger.info("worker %s: %s over %d ranks (%s..), %d KV blocks of %d tokens in %s, %d bytes a block per rank",
                config.resolved_worker_id, loaded.name, rank.tp.world_size, loaded.device, runner.num_blocks,
                config.block_size, kv_dtype(loaded, config), identity.block_bytes)
    return ServedModel(loaded, engine, identity, load_latency_profile(runner, config), ranks=ranks)


def check_split(config: WorkerConfig) -> None:
    """ValueError, before any rank starts, for a replica its model's heads or this host's GPUs
    cannot hold (each rank would start, load and fail alone)."""
    n = config.tensor_parallel_size
    fields = resolve_model(config.model).fields
    heads = fields.get("num_attention_heads")
    if isinstance(heads, int):
        HeadSplit(heads, fields.get("num_key_value_heads") or heads, 0, n)
    kind, _, index = config.device.partition(":")
    if kind == "cuda" and int(index or 0) + n > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {n} on {config.device} needs {int(index or 0) + n} GPUs; "
                         f"this host has {torch.cuda.device_count()}")


def follow_rank(rank_index: int, config: WorkerConfig, store_path: str) -> None:
    """Ranks 1..N-1: load, then follow rank 0's engine until it says Stop."""
    rank = load_rank(config, rank_index, store_path)
    if config.profile_latency:
        # Rank 0 measures its profile now (load_latency_profile): the same grid of steps, in
        # the same order, on every rank, so their collectives meet. Rank 0's fit is the one kept.
        from alise.worker.model.profiler import profile_runner

        profile_runner(rank.runner, max_num_seqs=config.max_num_seqs)
    engine = make_engine(rank, config)
    logger.info("rank %d of %d ready: %d KV blocks on %s", rank_index, rank.tp.world_size, rank.runner.num_blocks,
                rank.loaded.device)
    try:
        follow(engine, rank.tp.broadcast)
    finally:
        # Left to the interpreter's exit, the backend's threads can be torn down still running
        # (std::terminate: the rank dies of SIGABRT after a clean Stop).
        torch.distributed.destroy_process_group()
