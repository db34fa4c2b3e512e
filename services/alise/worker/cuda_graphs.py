"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start-up.

A decode step (every sequence feeds exactly one token) runs the same kernels every time; only the
number of sequences changes the shapes, and it is padded up to a bucket. Launching ~500 small
kernels from Python costs more than the GPU needs to run them at small batches; replaying a
captured graph costs one launch.

Inputs live in one static device buffer, filled from one pinned host buffer by a single copy per
step (laid out as ``ids | positions | slots | context_lens``, ``max_batch`` each, then the block
tables ``[max_batch, width]`` with ``width`` = blocks of the longest context the model allows).
Padding rows feed token 0 at position 0 with slot -1 (the Triton page write skips negative
slots) and a context of 1 over block 0, which is read but never written; their logits are
discarded. Nothing in a step synchronizes with the host; the caller's read-back of sampled
tokens is the only sync, and the next :meth:`DecodeInputs.fill` waits for the previous upload.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from alise.worker.attention import AttentionMetadata

logger = logging.getLogger(__name__)


class DecodeChunk(Protocol):
    """What a decode step needs of a :class:`alise.worker.model_runner.SeqChunk`."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every 8 up to 64, every 32 beyond, and
    ``max_batch`` itself. A step of ``n`` sequences runs the smallest bucket ``>= n``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {1, 2, 4, 8, max_batch}
    sizes.update(range(16, min(max_batch, 64) + 1, 8))
    sizes.update(range(96, max_batch + 1, 32))
    return sorted(s for s in sizes if s <= max_batch)


def pick_bucket(num_seqs: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``num_seqs`` sequences; None when none does."""
    i = bisect.bisect_left(buckets, num_seqs)
    return buckets[i] if i < len(buckets) else None


class DecodeInputs:
    """The static input buffers of decode graphs and their host-side staging."""

    def __init__(self, *, max_batch: int, width: int, block_size: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.width = width
        self.block_size = block_size
        on_cuda = device.type == "cuda"
        size = max_batch * (4 + width)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=on_cuda)
        self.device_buffer = torch.zeros(size, dtype=torch.int64, device=device)
        self._uploaded = torch.cuda.Event() if on_cuda else None
        self._host_np = self.host.numpy()

    def split(self, buffer: torch.Tensor | np.ndarray, batch: int) -> tuple:
        """Views ``(ids, positions, slots, context_lens, block_tables)`` of the first ``batch`` rows."""
        b = self.max_batch
        tables = buffer[4 * b:].reshape(b, self.width)
        return (buffer[0:batch], buffer[b:b + batch], buffer[2 * b:2 * b + batch],
                buffer[3 * b:3 * b + batch], tables[:batch])

    def fill(self, chunks: Sequence[DecodeChunk], bucket: int) -> None:
        """Write ``chunks`` (one token each) into rows ``0..len-1`` and padding into the rest of ``bucket``."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous step's copy has left the host buffer
        ids, positions, slots, lens, tables = self.split(self._host_np, bucket)
        bs = self.block_size
        for i, chunk in enumerate(chunks):
            pos = chunk.start_pos
            num_pages = pos // bs + 1
            ids[i] = chunk.token_ids[0]
            positions[i] = pos
            lens[i] = pos + 1
            slots[i] = chunk.block_table[pos // bs] * bs + pos % bs
            tables[i, :num_pages] = chunk.block_table[:num_pages]
        n = len(chunks)
        ids[n:] = 0
        positions[n:] = 0
        slots[n:] = -1
        lens[n:] = 1
        tables[n:, 0] = 0

    def upload(self) -> None:
        """One asynchronous host-to-device copy of the whole staging buffer."""
        self.device_buffer.copy_(self.host, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()

    def metadata(self, batch: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """``(input_ids, metadata)`` over the device buffer's first ``batch`` rows (static addresses)."""
        ids, positions, slots, lens, tables = self.split(self.device_buffer, batch)
        return ids, AttentionMetadata(positions=positions, slot_mapping=slots, prefills=(), decode_rows=None,
                                      decode_block_tables=tables, decode_context_lens=lens, is_all_decode=True)


class DecodeGraphs:
    """Captured decode steps, one per bucket, sharing one memory pool.

    ``forward(input_ids, metadata)`` must return the float32 logits ``[batch, vocab]`` of a decode
    step and use only capturable kernels (the Triton attention backend).
    """

    def __init__(self, forward: Callable[[torch.Tensor, AttentionMetadata], torch.Tensor], *, max_batch: int,
                 width: int, block_size: int, device: torch.device) -> None:
        self.forward = forward
        self.device = device
        self.buckets = decode_buckets(max_batch)
        self.inputs = DecodeInputs(max_batch=max_batch, width=width, block_size=block_size, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its pool."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        pool = None
        for bucket in reversed(self.buckets):
            self.inputs.fill([], bucket)
            self.inputs.upload()
            ids, meta = self.inputs.metadata(bucket)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # compiles Triton kernels, sets up cuBLAS workspaces
                    self.forward(ids, meta)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                logits = self.forward(ids, meta)
            pool = graph.pool()
            self._graphs[bucket] = (graph, logits)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode graphs for batch sizes %s", self.buckets)

    def can_run(self, chunks: Sequence[DecodeChunk]) -> bool:
        return 0 < len(chunks) <= self.max_batch and all(len(c.token_ids) == 1 for c in chunks)

    @property
    def is_captured(self) -> bool:
        return bool(self._graphs)

    def run(self, chunks: Sequence[DecodeChunk]) -> torch.Tensor:
        """Logits ``[len(chunks), vocab]`` (float32, a fresh tensor) of one decode step.

        Before :meth:`capture` (or on the CPU) the same padded static-buffer step runs eagerly,
        which is how the CPU tests check the buffers and the padding.
        """
        bucket = pick_bucket(len(chunks), self.buckets)
        self.inputs.fill(chunks, bucket)
        self.inputs.upload()
        if bucket in self._graphs:
            graph, logits = self._graphs[bucket]
            graph.replay()
        else:
            ids, meta = self.inputs.metadata(bucket)
            with torch.inference_mode():
                logits = self.forward(ids, meta)
        return logits[:len(chunks)].clone()
