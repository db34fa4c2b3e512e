"""CUDA graphs for decode steps (one per batch-size bucket) and for mixed steps (one per
token-count and sequence-count bucket), captured at start-up.

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
An overlapped step (:mod:`alise.worker.model.overlap`) is filled and uploaded while the step
before it runs: its copy into the static buffers is queued behind that step's graph on the
same stream, so a graph never reads the next step's inputs.

A mixed step (prefill chunks at any start position beside decodes, as chunked prefill feeds
them) has two shapes, its row count ``T`` and its sequence count ``S``; both are padded up to a
bucket and attention runs as one unified-kernel launch whose grid depends on ``(T, S)`` only
(:mod:`alise.worker.kernels.triton_unified`), so one graph serves any split of the rows among the
sequences. :class:`MixedInputs` and :class:`MixedGraphs` mirror the decode pair.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from alise.worker.model.attention import AttentionMetadata, UnifiedStep
from alise.worker.model.overlap import TokenGather

logger = logging.getLogger(__name__)


class DecodeChunk(Protocol):
    """What a decode step needs of a :class:`alise.worker.model.runner.SeqChunk`."""

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

    def metadata(self, batch: int, options: dict | None = None) -> tuple[torch.Tensor, AttentionMetadata]:
        """``(input_ids, metadata)`` over the device buffer's first ``batch`` rows (static addresses)."""
        ids, positions, slots, lens, tables = self.split(self.device_buffer, batch)
        return ids, AttentionMetadata(positions=positions, slot_mapping=slots, prefills=(), decode_rows=None,
                                      decode_block_tables=tables, decode_context_lens=lens, is_all_decode=True,
                                      decode_options=options)


class DecodeGraphs:
    """Captured decode steps, one per bucket, sharing one memory pool.

    ``forward(input_ids, metadata)`` must return the float32 logits ``[batch, vocab]`` of a decode
    step and use only capturable kernels (the Triton attention backend). ``options_for(bucket)``
    gives the decode kernel's options for a bucket (split-K ranges, fused merge; None: defaults).
    """

    def __init__(self, forward: Callable[[torch.Tensor, AttentionMetadata], torch.Tensor], *, max_batch: int,
                 width: int, block_size: int, device: torch.device,
                 options_for: Callable[[int], dict | None] = lambda bucket: None) -> None:
        self.forward = forward
        self.device = device
        self.options_for = options_for
        self.buckets = decode_buckets(max_batch)
        self.inputs = DecodeInputs(max_batch=max_batch, width=width, block_size=block_size, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture(self):
        """Capture every bucket, largest first so the smaller ones reuse its pool; returns the pool."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        pool = None
        for bucket in reversed(self.buckets):
            self.inputs.fill([], bucket)
            self.inputs.upload()
            ids, meta = self.inputs.metadata(bucket, self.options_for(bucket))
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
        return pool

    def can_run(self, chunks: Sequence[DecodeChunk]) -> bool:
        return 0 < len(chunks) <= self.max_batch and all(len(c.token_ids) == 1 for c in chunks)

    @property
    def is_captured(self) -> bool:
        return bool(self._graphs)

    def run(self, chunks: Sequence[DecodeChunk], gather: TokenGather | None = None) -> torch.Tensor:
        """Logits ``[len(chunks), vocab]`` (float32, a fresh tensor) of one decode step;
        ``gather`` writes ids still on the device over the uploaded ones (stream-ordered).

        Before :meth:`capture` (or on the CPU) the same padded static-buffer step runs eagerly,
        which is how the CPU tests check the buffers and the padding.
        """
        bucket = pick_bucket(len(chunks), self.buckets)
        self.inputs.fill(chunks, bucket)
        self.inputs.upload()
        if gather is not None:
            gather.apply(self.inputs.split(self.inputs.device_buffer, bucket)[0])
        if bucket in self._graphs:
            graph, logits = self._graphs[bucket]
            graph.replay()
        else:
            ids, meta = self.inputs.metadata(bucket, self.options_for(bucket))
            with torch.inference_mode():
                logits = self.forward(ids, meta)
        return logits[:len(chunks)].clone()


# --------------------------------------------------------------------------- mixed steps

def token_buckets(max_tokens: int) -> list[int]:
    """Token counts that get mixed-step graphs: 16, 32, 64, then every 64 up to ``max_tokens``,
    and ``max_tokens`` itself. A step of ``T`` rows runs the smallest bucket ``>= T``."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    sizes = {16, 32, 64, max_tokens}
    sizes.update(range(128, max_tokens + 1, 64))
    return sorted(s for s in sizes if s <= max_tokens)


def mixed_seq_buckets(num_tokens: int, max_seqs: int) -> list[int]:
    """Sequence counts captured for a token bucket: 4, 16, 64, then doubling, up to
    ``min(num_tokens, max_seqs)`` (each sequence feeds at least one row), which is included."""
    cap = min(num_tokens, max_seqs)
    sizes = {4, 16, 64, cap}
    size = 128
    while size < cap:
        sizes.add(size)
        size *= 2
    return sorted(s for s in sizes if s <= cap)


class MixedInputs:
    """Static input buffers of mixed-step graphs, one pinned host buffer and one device copy.

    Layout (int64): ``ids | positions | slots`` (``max_tokens`` each), ``logit_rows | seq_lens``
    (``max_seqs`` each), ``query_start`` (``max_seqs + 1``), block tables ``[max_seqs, width]``.
    The views of a ``(T, S)`` bucket are prefixes of these, so their addresses never move.
    Padding rows feed token 0 at position 0 with slot -1 (written nowhere) and belong to no
    sequence; padding sequences have no rows (``query_start`` repeats the end) and read nothing.
    """

    def __init__(self, *, max_tokens: int, max_seqs: int, width: int, block_size: int,
                 device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.width, self.block_size = max_tokens, max_seqs, width, block_size
        size = 3 * max_tokens + 3 * max_seqs + 1 + max_seqs * width
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=on_cuda)
        self.device_buffer = torch.zeros(size, dtype=torch.int64, device=device)
        self._uploaded = torch.cuda.Event() if on_cuda else None
        self._host_np = self.host.numpy()

    def split(self, buffer, num_tokens: int, num_seqs: int) -> tuple:
        """Views ``(ids, positions, slots, logit_rows, seq_lens, query_start, tables)`` of a bucket."""
        t, s = self.max_tokens, self.max_seqs
        base = 3 * t
        tables = buffer[base + 3 * s + 1:].reshape(s, self.width)
        return (buffer[0:num_tokens], buffer[t:t + num_tokens], buffer[2 * t:2 * t + num_tokens],
                buffer[base:base + num_seqs], buffer[base + s:base + s + num_seqs],
                buffer[base + 2 * s:base + 2 * s + num_seqs + 1], tables[:num_seqs])

    def fill(self, chunks: Sequence, num_tokens: int, num_seqs: int, wants_logits: Sequence[bool]) -> int:
        """Write ``chunks`` and the padding of bucket ``(num_tokens, num_seqs)``; returns how many
        logits rows are wanted (the first ``logit_rows`` entries, in chunk order)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous step's copy has left the host buffer
        ids, positions, slots, logit_rows, seq_lens, query_start, tables = self.split(
            self._host_np, num_tokens, num_seqs)
        bs = self.block_size
        lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
        starts = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=len(chunks))
        n_rows, n_seqs = int(lens.sum()), len(chunks)
        query_start[0] = 0
        np.cumsum(lens, out=query_start[1:n_seqs + 1])
        query_start[n_seqs + 1:] = n_rows
        seq_lens[:n_seqs] = starts + lens
        seq_lens[n_seqs:] = 1
        ids[:n_rows] = [t for c in chunks for t in c.token_ids]
        first_rows = query_start[:n_seqs]
        pos = np.arange(n_rows, dtype=np.int64) + np.repeat(starts - first_rows, lens)
        positions[:n_rows] = pos
        for i, chunk in enumerate(chunks):
            k = -(-int(seq_lens[i]) // bs)
            tables[i, :k] = chunk.block_table[:k]
        tables[n_seqs:, 0] = 0
        seq_of_row = np.repeat(np.arange(n_seqs), lens)
        slots[:n_rows] = tables[seq_of_row, pos // bs] * bs + pos % bs
        ids[n_rows:] = 0
        positions[n_rows:] = 0
        slots[n_rows:] = -1
        wanted = (first_rows + lens - 1)[np.fromiter(wants_logits, dtype=bool, count=n_seqs)]
        logit_rows[:len(wanted)] = wanted
        logit_rows[len(wanted):] = 0
        return len(wanted)

    def upload(self) -> None:
        self.device_buffer.copy_(self.host, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()

    def metadata(self, num_tokens: int, num_seqs: int, config: object) -> tuple:
        """``(input_ids, metadata, logit_rows)`` over the device buffer (static addresses)."""
        ids, positions, slots, logit_rows, seq_lens, query_start, tables = self.split(
            self.device_buffer, num_tokens, num_seqs)
        unified = UnifiedStep(query_start=query_start, seq_lens=seq_lens, block_tables=tables, config=config)
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, prefills=(), decode_rows=None,
                                 decode_block_tables=None, decode_context_lens=None, is_all_decode=False,
                                 unified=unified)
        return ids, meta, logit_rows


class MixedGraphs:
    """Captured mixed steps (decodes and prefill chunks together), one graph per ``(T, S)`` bucket.

    ``forward(input_ids, metadata, logit_rows, out)`` must write the logits of the rows
    ``logit_rows`` into ``out [S, vocab]`` (model dtype) with capturable kernels only; every graph
    writes into one shared logits buffer, so graph memory does not grow with the bucket count.
    ``config_for(T)`` gives the unified kernel's launch configuration of a token bucket.
    """

    def __init__(self, forward: Callable, *, max_tokens: int, max_seqs: int, width: int, block_size: int,
                 vocab_size: int, dtype: torch.dtype, device: torch.device, config_for: Callable[[int], object],
                 tokens: Sequence[int] | None = None) -> None:
        self.forward = forward
        self.device = device
        self.config_for = config_for
        self.token_buckets = list(tokens) if tokens is not None else token_buckets(max_tokens)
        self.max_seqs = max_seqs
        self.inputs = MixedInputs(max_tokens=self.token_buckets[-1], max_seqs=max_seqs, width=width,
                                  block_size=block_size, device=device)
        self.logits = torch.empty(max_seqs, vocab_size, dtype=dtype, device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.num_replays = 0  # steps served by a captured graph (a metric; the tests read it)

    def buckets(self) -> list[tuple[int, int]]:
        return [(t, s) for t in self.token_buckets for s in mixed_seq_buckets(t, self.max_seqs)]

    def pick(self, num_tokens: int, num_seqs: int) -> tuple[int, int] | None:
        """The smallest ``(T, S)`` bucket holding the step; None when none does."""
        t = pick_bucket(num_tokens, self.token_buckets)
        if t is None:
            return None
        s = pick_bucket(num_seqs, mixed_seq_buckets(t, self.max_seqs))
        return None if s is None else (t, s)

    def can_run(self, chunks: Sequence) -> bool:
        return self.pick(sum(len(c.token_ids) for c in chunks), len(chunks)) is not None

    def _step(self, bucket: tuple[int, int]) -> None:
        ids, meta, rows = self.inputs.metadata(*bucket, self.config_for(bucket[0]))
        self.forward(ids, meta, rows, self.logits[:bucket[1]])

    def capture(self, pool=None):
        """Capture every bucket, largest first, in ``pool`` (shared with the decode graphs if
        given); returns the pool."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        for bucket in sorted(self.buckets(), reverse=True):
            self.inputs.fill([], *bucket, [])
            self.inputs.upload()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                self._step(bucket)  # compiles this bucket's kernels before capture
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                self._step(bucket)
            pool = graph.pool()
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d mixed-step graphs for token buckets %s", len(self._graphs), self.token_buckets)
        return pool

    def drop_tokens(self, keep: Sequence[int]) -> None:
        """Keep only the token buckets in ``keep`` (the others measured slower than eager)."""
        self.token_buckets = [t for t in self.token_buckets if t in keep]
        self._graphs = {b: g for b, g in self._graphs.items() if b[0] in keep}

    def run(self, chunks: Sequence, wants_logits: Sequence[bool], gather: TokenGather | None = None) -> torch.Tensor:
        """Float32 logits (a fresh tensor) of the last row of each chunk that wants them
        (``gather``: as :meth:`DecodeGraphs.run`).

        Before :meth:`capture` (or on the CPU) the same padded static-buffer step runs eagerly,
        which is how the CPU tests check the buffers and the padding.
        """
        bucket = self.pick(sum(len(c.token_ids) for c in chunks), len(chunks))
        num_wanted = self.inputs.fill(chunks, *bucket, wants_logits)
        self.inputs.upload()
        if gather is not None:
            gather.apply(self.inputs.split(self.inputs.device_buffer, *bucket)[0])
        graph = self._graphs.get(bucket)
        if graph is not None:
            graph.replay()
            self.num_replays += 1
        else:
            with torch.inference_mode():
                self._step(bucket)
        return self.logits[:num_wanted].to(torch.float32, copy=True)
