"""Tensor parallelism's collectives: one rank of a model replica split over ``world_size`` ranks.

Megatron's layout (:mod:`alise.worker.model.tp_shard` cuts the weights): Q/K/V and the MLP's
up-projections are column-parallel (each rank computes its heads and its slice of the
intermediate size), the attention output and down projections row-parallel (each rank a partial
sum), so a layer needs one all-reduce after the attention and one after the MLP. The embedding
and the LM head are vocabulary-parallel: each rank holds ``vocab_per_rank`` consecutive rows
(the last rank's tail padded with zeros); the embedding is an all-reduce of each rank's rows,
masked, and the logits an all-gather of each rank's columns.

Two process groups: ``group`` carries the tensors of the forward (NCCL on CUDA, gloo on the
CPU), ``cpu_group`` (gloo) the pickled messages of the engine (plans, the kernel plan): a
follower rank waits on it between steps, for as long as the worker idles, so its timeout is long.

NOTE: every rank must issue the same collectives, with the same shapes, in the same order.
The engines stay in step because they apply the same messages (alise.worker.tp_engine); the
kernel plan and the kept graph buckets, which a rank would otherwise choose by its own
timings and which decide the padded shapes of a step, are rank 0's (``agree``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: How long a follower waits for the next message: an idle worker sends none.
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class TensorParallel:
    """This process's rank of a tensor-parallel replica and its collectives."""

    rank: int
    world_size: int
    group: object
    cpu_group: object
    vocab_size: int = 0

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.world_size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's ``x`` (in place)."""
        dist.all_reduce(x, group=self.group)
        return x

    def embed(self, module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The vocabulary-parallel embedding of ``input_ids``: each rank looks up the ids in its
        rows (zeros elsewhere; ``module`` may scale, as Gemma's does: zero stays zero), summed."""
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        out = module(local.masked_fill(outside, 0))
        out.masked_fill_(outside[:, None], 0)
        return self.all_reduce(out)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """``[T, vocab]`` from each rank's ``[T, vocab_per_rank]`` columns (padding dropped)."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, :self.vocab_size]

    def broadcast(self, obj: object = None) -> object:
        """Rank 0's ``obj`` on every rank (pickled over ``cpu_group``; others pass None)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def agree(self, obj: object) -> object:
        """Rank 0's value of a choice every rank made (see the module's NOTE)."""
        return self.broadcast(obj if self.is_driver else None)

    def broadcast_tokens(self, tokens: list[int] | None, count: int) -> list[int]:
        """The tokens rank 0 sampled (``count`` of them), on every rank."""
        data = torch.tensor(tokens if self.is_driver else [0] * count, dtype=torch.int64)
        dist.broadcast(data, src=0, group=self.cpu_group)
        return data.tolist()

    def min_over_ranks(self, value: int) -> int:
        data = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(data, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(data.item())


def rank_device(device: str, rank: int) -> str:
    """Rank ``rank``'s device: ``cuda:i`` -> ``cuda:(i + rank)``; the CPU for every rank."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return device
    return f"cuda:{int(index or 0) + rank}"


def init_tensor_parallel(rank: int, world_size: int, store_path: str, device: str,
                         vocab_size: int) -> TensorParallel:
    """Joins the replica's process groups through the file store at ``store_path`` (every rank
    of one replica passes the same path): NCCL for the forward on CUDA, gloo otherwise."""
    torch_device = torch.device(device)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    elif world_size > 1:
        # Ranks share the host's cores: each takes its share, not all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # NCCL binds its communicator to the rank's device now (device_id), before any graph is captured.
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=IDLE_TIMEOUT, device_id=torch_device if backend == "nccl" else None)
    group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if backend != "gloo" else group
    return TensorParallel(rank, world_size, group, cpu_group, vocab_size)
