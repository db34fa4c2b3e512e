"""KV moves of paused jobs: quantize in place (int8 / int4), swap to a host pool and back.

Mechanism only; the scheduler's memory planner decides. Every command is checked before
anything is touched, so a refused command (host pool full, no such transition) changes
nothing.

Quantized storage (in the device pool itself, so the freed blocks are real blocks)
---------------------------------------------------------------------------------
A job whose KV fills ``n`` full-precision blocks is quantized in place into the first
``m = quantized_blocks(n, bits)`` of its own blocks (``alise.core.blocks``: 9/16 of n for
int8, 5/16 for int4, rounded up), and the other ``n - m`` go back to the allocator. Block
``b`` of the cache is, per layer and per K/V, a contiguous chunk of ``C = block_size *
kv_heads * head_dim * itemsize`` bytes. For each (layer, K/V) the job's values, viewed as
groups of ``G = 32`` consecutive channels of one token and one head (``G = head_dim`` when
the head is narrower), are encoded as one byte stream

    codes  [num_groups, G * bits / 8]  uint8, asymmetric: q = round((x - zero) / scale)
                                       clamped to [0, 2**bits - 1]; int4 packs two codes
                                       per byte, even channel in the low nibble
    scales [num_groups]                float16 (max - min) / (2**bits - 1)
    zeros  [num_groups]                float16 (the group's minimum)

and written across the ``m`` chunks of that (layer, K/V), in block-table order; the tail
is padding. At 16 bits that is 1 + 4/32 = 1.125 bytes (int8) or 0.625 bytes (int4) per
value of 2, exactly the 9/16 and 5/16 the scheduler counts; a 32-bit cache uses less than
the blocks it keeps. Dequantizing allocates ``n - m`` blocks again and writes the values
back in full precision. Why G = 32: the scale/zero overhead is 12.5 % of an int8 payload
and 25 % of an int4 one, and 32 channels is the granularity at which int4 KV keeps the
model's logits within a few per cent (KIVI-style; figures in tests/unit/test_kv_quant.py).
On CUDA with Triton, quantizing from full precision and dequantizing run as fused kernels
(:mod:`alise.worker.triton_kvquant`: the pages are read in place, the same bytes come out);
elsewhere, and for int8 -> int4, the torch codec below.

Host pool
---------
``[num_host_blocks, 2, num_layers, C]`` bytes, pinned when the device is CUDA: one host
block is one device block (all layers, K then V) in whatever format it had (full or
quantized chunks are moved as raw bytes, so quantized jobs swap too). On CUDA every copy
runs on one side stream, in chunks: gather the blocks into a contiguous staging buffer,
then one asynchronous copy per run of consecutive host blocks. Swap-out records an event
and keeps its device blocks allocated until the event has fired (they are *reported* free:
the scheduler counts them free, and an allocation that needs them waits for the copy).
Swap-in allocates device blocks, records an event, and the step that runs the job makes
the compute stream wait for it, so a job resumes only when its blocks are back. The host
blocks are free at once in both directions: only the one side stream touches them, in
order. On the CPU the copies are plain and synchronous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alise.core.blocks import (
    DEVICE_PLACES, HOST_PLACES, QUANTIZED_BITS, QUANTIZED_FRACTION, blocks_for, quantized_blocks,
)
from alise.core.commands import KvAction
from alise.core.job import KvPlace
from alise.worker import triton_kvquant
from alise.worker.block_allocator import BlockAllocator
from alise.worker.kv_cache import KVCache

GROUP_SIZE = 32
#: Bound on the device memory a move borrows for staging and dequantized values.
STAGING_BYTES = 256 << 20

_HOST_OF = {KvPlace.DEVICE: KvPlace.HOST, KvPlace.DEVICE_INT8: KvPlace.HOST_INT8,
            KvPlace.DEVICE_INT4: KvPlace.HOST_INT4}
_DEVICE_OF = {host: device for device, host in _HOST_OF.items()}
_QUANTIZED = {8: KvPlace.DEVICE_INT8, 4: KvPlace.DEVICE_INT4}


# --------------------------------------------------------------------------- group codec

def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [..., G]`` -> (codes ``[..., G * bits // 8]`` uint8, scale, zero ``[...]`` float16)."""
    levels = (1 << bits) - 1
    x = x.float()
    lo = x.amin(-1).clamp(-65504, 65504)
    hi = x.amax(-1).clamp(-65504, 65504)
    zero = lo.half()
    scale = ((hi - lo) / levels).half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: codes 0
    q = ((x - zero.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, levels)
    q = q.to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`, in float32."""
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    return codes.float() * scale.float()[..., None] + zero.float()[..., None]


class KvCodec:
    """Encodes full-precision blocks of a layer range into quantized byte streams and back."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        shape = cache.shape
        self.group = min(GROUP_SIZE, shape.head_dim)
        if shape.head_dim % self.group:
            raise ValueError(f"head_dim {shape.head_dim} is not a multiple of {self.group}")
        self.values_per_block = cache.block_size * shape.num_kv_heads * shape.head_dim
        self.itemsize = cache.key_cache.element_size()
        self.chunk_bytes = self.values_per_block * self.itemsize

    def stream_bytes(self, num_full: int, bits: int) -> int:
        num_values = num_full * self.values_per_block
        return num_values * bits // 8 + 4 * (num_values // self.group)

    def fits(self, bits: int) -> bool:
        """Does the layout fit in the blocks the scheduler counts, for every job size?"""
        num, den = QUANTIZED_FRACTION[bits]
        # m * C >= stream(n) for all n  <=>  (num / den) * C >= stream(1)
        return num * self.chunk_bytes >= den * self.stream_bytes(1, bits)

    def encode(self, values: torch.Tensor, bits: int) -> torch.Tensor:
        """``values [Lc, n, block_size, heads, dim]`` -> ``[Lc, stream_bytes]`` uint8."""
        num_layers = values.shape[0]
        groups = values.reshape(num_layers, -1, self.group)
        codes, scale, zero = quantize_groups(groups, bits)
        return torch.cat((codes.reshape(num_layers, -1), scale.view(torch.uint8),
                          zero.view(torch.uint8)), dim=1)

    def decode(self, stream: torch.Tensor, num_full: int, bits: int) -> torch.Tensor:
        """``[Lc, >= stream_bytes]`` uint8 -> values ``[Lc, n, block_size, heads, dim]`` (cache dtype)."""
        num_layers = stream.shape[0]
        num_groups = num_full * self.values_per_block // self.group
        code_bytes = num_groups * self.group * bits // 8
        codes = stream[:, :code_bytes].reshape(num_layers, num_groups, -1)
        scale = stream[:, code_bytes:code_bytes + 2 * num_groups].contiguous().view(torch.float16)
        zero = stream[:, code_bytes + 2 * num_groups:code_bytes + 4 * num_groups].contiguous().view(
            torch.float16)
        values = dequantize_groups(codes, scale, zero, bits)
        shape = self.cache.key_cache.shape
        return values.reshape(num_layers, num_full, *shape[2:]).to(self.cache.key_cache.dtype)


def _as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """``[L, num_blocks, ...]`` -> ``[L, num_blocks, C]`` uint8 view of the same storage."""
    return cache.view(torch.uint8).view(cache.shape[0], cache.shape[1], -1)


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for i, block_id in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block_id:
            start, first, length = runs[-1]
            runs[-1] = (start, first, length + 1)
        else:
            runs.append((i, block_id, 1))
    return runs


@dataclass
class KvState:
    """Where a sequence's KV is (the engine's ``Sequence`` carries these fields)."""

    place: KvPlace = KvPlace.DEVICE
    block_table: list[int] = field(default_factory=list)
    host_blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    ready_event: object | None = None


class KvOffload:
    """Quantize / swap / restore the KV of paused sequences of one engine."""

    def __init__(self, cache: KVCache, allocator: BlockAllocator, num_host_blocks: int) -> None:
        self.cache = cache
        self.allocator = allocator
        self.codec = KvCodec(cache)
        self.device = cache.key_cache.device
        self.is_cuda = self.device.type == "cuda"
        self.num_host_blocks = num_host_blocks
        self.host_allocator = BlockAllocator(num_host_blocks) if num_host_blocks else None
        self.host_pool: torch.Tensor | None = None
        if num_host_blocks:
            layers = cache.shape.num_layers
            self.host_pool = torch.empty((num_host_blocks, 2, layers, self.codec.chunk_bytes),
                                         dtype=torch.uint8, pin_memory=self.is_cuda)
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        #: Quantize / dequantize with the Triton kernels (CUDA), else the torch codec.
        self.fused = triton_kvquant.is_available(self.device)
        #: Swap-outs in flight: (event, device block ids still being read).
        self.pending_out: list[tuple[object, list[int]]] = []
        self._k = _as_bytes(cache.key_cache)
        self._v = _as_bytes(cache.value_cache)

    # ----------------------------------------------------------------- accounting

    @property
    def num_free_device(self) -> int:
        """Free device blocks as the scheduler counts them (swap-outs in flight included)."""
        return self.allocator.num_free + sum(len(ids) for _, ids in self.pending_out)

    @property
    def num_free_host(self) -> int:
        return self.host_allocator.num_free if self.host_allocator else 0

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Device blocks; waits for in-flight swap-outs only when the free list is short."""
        self.reclaim()
        while not self.allocator.can_allocate(num_blocks) and self.pending_out:
            event, ids = self.pending_out.pop(0)
            event.synchronize()
            self.allocator.free(ids)
        return self.allocator.allocate(num_blocks)

    def reclaim(self) -> None:
        while self.pending_out and self.pending_out[0][0].query():
            self.allocator.free(self.pending_out.pop(0)[1])

    def synchronize(self) -> None:
        """Waits for every copy (tests, shutdown)."""
        if self.stream is not None:
            self.stream.synchronize()
        self.reclaim()

    # ----------------------------------------------------------------- commands

    def pause(self, seq: KvState, action: KvAction) -> str | None:
        """Applies a KV action to a paused sequence; a refusal leaves it untouched."""
        if action is KvAction.KEEP:
            return self.swap_in(seq) if seq.place in HOST_PLACES else None
        if action is KvAction.DROP:
            self.release(seq)
            return None
        if action is KvAction.SWAP_TO_HOST:
            return self.swap_out(seq)
        return self.quantize(seq, 8 if action is KvAction.QUANTIZE_INT8 else 4)

    def resume(self, seq: KvState) -> str | None:
        """Back to full precision on the device (swap-in, then dequantize), or refuse whole."""
        full = blocks_for(seq.num_cached, self.cache.block_size)
        held = len(seq.block_table) if seq.place in DEVICE_PLACES else 0
        need = full - held if seq.place is not KvPlace.NONE else 0
        if need > self.num_free_device:
            return f"no free device blocks to resume: {need} needed, {self.num_free_device} free"
        if seq.place in HOST_PLACES:
            self.swap_in(seq)
        if seq.place in (KvPlace.DEVICE_INT8, KvPlace.DEVICE_INT4) and full:
            self._dequantize(seq, full)
        seq.place = KvPlace.DEVICE
        return None

    def release(self, seq: KvState) -> None:
        self.wait_ready([seq])  # the compute stream must not reuse blocks a copy still fills
        self.allocator.free(seq.block_table)
        if seq.host_blocks:
            self.host_allocator.free(seq.host_blocks)
        seq.block_table, seq.host_blocks = [], []
        seq.num_cached = 0
        seq.ready_event = None
        seq.place = KvPlace.NONE

    def wait_ready(self, seqs: list[KvState]) -> None:
        """Makes the compute stream wait for the swap-ins of ``seqs`` (no host sync)."""
        for seq in seqs:
            if seq.ready_event is not None:
                torch.cuda.current_stream(self.device).wait_event(seq.ready_event)
                seq.ready_event = None

    # ----------------------------------------------------------------- quantization

    def quantize(self, seq: KvState, bits: int) -> str | None:
        source_bits = QUANTIZED_BITS.get(seq.place, 16)
        if seq.place not in DEVICE_PLACES or source_bits <= bits:
            return f"cannot quantize KV at {seq.place.value} to int{bits}"
        if not self.codec.fits(bits):
            num, den = QUANTIZED_FRACTION[bits]
            return (f"int{bits} groups of {self.codec.group} channels do not fit in {num}/{den} "
                    f"of the blocks at {8 * self.codec.itemsize} bits")
        self.wait_ready([seq])
        full = blocks_for(seq.num_cached, self.cache.block_size)
        keep = quantized_blocks(full, bits)
        table = seq.block_table
        if full == 0:
            seq.place = _QUANTIZED[bits]
            return None
        if self.fused and source_bits == 16:
            self._quantize_fused(table, full, keep, bits)
        else:
            for first, last in self._layer_chunks(full):
                for raw in (self._k, self._v):
                    values = self._read(raw, seq, table, first, last, full, source_bits)
                    self._write_stream(raw, table[:keep], first, last,
                                       self.codec.encode(values, bits))
        self.allocator.free(table[keep:])
        seq.block_table = table[:keep]
        seq.place = _QUANTIZED[bits]
        return None

    def _quantize_fused(self, table: list[int], full: int, keep: int, bits: int) -> None:
        """Triton: pages -> stream buffer (one read of the KV) -> the kept blocks."""
        index = torch.tensor(table, dtype=torch.int64, device=self.device)
        for first, last in self._layer_chunks(full, work_bytes_per_value=self.codec.itemsize):
            for cache, raw in ((self.cache.key_cache, self._k), (self.cache.value_cache, self._v)):
                buf = torch.empty((last - first, keep * self.codec.chunk_bytes), dtype=torch.uint8,
                                  device=self.device)
                triton_kvquant.quantize_pages(cache[first:last], index, full, self.codec.group,
                                              bits, buf)
                raw[first:last].index_copy_(1, index[:keep], buf.view(last - first, keep, -1))

    def _dequantize(self, seq: KvState, full: int) -> None:
        self.wait_ready([seq])
        bits = QUANTIZED_BITS[seq.place]
        extra = self.allocate(full - len(seq.block_table))
        table = seq.block_table + extra
        if self.fused:
            kept = torch.tensor(seq.block_table, dtype=torch.int64, device=self.device)
            index = torch.tensor(table, dtype=torch.int64, device=self.device)
            for first, last in self._layer_chunks(full, work_bytes_per_value=self.codec.itemsize):
                for cache, raw in ((self.cache.key_cache, self._k),
                                   (self.cache.value_cache, self._v)):
                    stream = raw[first:last].index_select(1, kept).view(last - first, -1)
                    triton_kvquant.dequantize_pages(stream, index, full, self.codec.group, bits,
                                                    cache[first:last])
            seq.block_table = table
            return
        for first, last in self._layer_chunks(full):
            for cache, raw in ((self.cache.key_cache, self._k), (self.cache.value_cache, self._v)):
                values = self._read(raw, seq, seq.block_table, first, last, full, bits)
                index = torch.tensor(table, dtype=torch.int64, device=self.device)
                cache[first:last].index_copy_(1, index, values)
        seq.block_table = table

    def _read(self, raw: torch.Tensor, seq: KvState, table: list[int], first: int, last: int,
              full: int, bits: int) -> torch.Tensor:
        """Full-precision values ``[last - first, full, ...]`` of a job stored at ``bits``."""
        index = torch.tensor(table, dtype=torch.int64, device=self.device)
        chunks = raw[first:last].index_select(1, index)
        if bits == 16:
            dtype = self.cache.key_cache.dtype
            shape = self.cache.key_cache.shape
            return chunks.view(dtype).view(last - first, len(table), *shape[2:])
        return self.codec.decode(chunks.reshape(last - first, -1), full, bits)

    def _write_stream(self, raw: torch.Tensor, table: list[int], first: int, last: int,
                      stream: torch.Tensor) -> None:
        num_layers = last - first
        buf = torch.zeros((num_layers, len(table) * self.codec.chunk_bytes), dtype=torch.uint8,
                          device=self.device)
        buf[:, :stream.shape[1]] = stream
        index = torch.tensor(table, dtype=torch.int64, device=self.device)
        raw[first:last].index_copy_(1, index, buf.view(num_layers, len(table), -1))

    def _layer_chunks(self, full: int, work_bytes_per_value: int = 12) -> list[tuple[int, int]]:
        """Layer ranges whose temporaries stay under ``STAGING_BYTES`` (the torch codec's
        float32 work and codes: ~12 bytes a value; the fused path's stream: under 2)."""
        per_layer = max(1, full * self.codec.values_per_block * work_bytes_per_value)
        step = max(1, STAGING_BYTES // per_layer)
        num_layers = self.cache.shape.num_layers
        return [(i, min(i + step, num_layers)) for i in range(0, num_layers, step)]

    # ----------------------------------------------------------------- swapping

    def swap_out(self, seq: KvState) -> str | None:
        if seq.place not in DEVICE_PLACES:
            return f"cannot swap out KV at {seq.place.value}"
        count = len(seq.block_table)
        host = self.host_allocator.allocate(count) if self.host_allocator else None
        if host is None:
            return f"host pool full: {count} blocks needed, {self.num_free_host} free"
        event = self._copy(seq.block_table, host, to_host=True)
        if event is None:
            self.allocator.free(seq.block_table)
        else:
            self.pending_out.append((event, seq.block_table))
        seq.block_table, seq.host_blocks = [], host
        seq.place = _HOST_OF[seq.place]
        return None

    def swap_in(self, seq: KvState) -> str | None:
        count = len(seq.host_blocks)
        device = self.allocate(count)
        if device is None:
            return f"no free device blocks for {count} swapped-in blocks"
        seq.ready_event = self._copy(device, seq.host_blocks, to_host=False)
        self.host_allocator.free(seq.host_blocks)
        seq.block_table, seq.host_blocks = device, []
        seq.place = _DEVICE_OF[seq.place]
        return None

    def _copy(self, device_ids: list[int], host_ids: list[int], *, to_host: bool):
        """Copies blocks between the device cache and the host pool; returns the CUDA event
        that marks completion (None on the CPU, where the copy is done on return)."""
        if self.stream is None:
            self._copy_chunk(device_ids, host_ids, to_host)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            step = max(1, STAGING_BYTES // (2 * self.cache.shape.num_layers * self.codec.chunk_bytes))
            for i in range(0, len(device_ids), step):
                self._copy_chunk(device_ids[i:i + step], host_ids[i:i + step], to_host)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _copy_chunk(self, device_ids: list[int], host_ids: list[int], to_host: bool) -> None:
        index = torch.tensor(device_ids, dtype=torch.int64, device=self.device)
        if to_host:
            staging = torch.stack((self._k.index_select(1, index), self._v.index_select(1, index)))
            staging = staging.permute(2, 0, 1, 3).contiguous()   # [n, 2, L, C]
            for start, first, length in _runs(host_ids):
                self.host_pool[first:first + length].copy_(staging[start:start + length],
                                                           non_blocking=True)
            return
        staging = torch.empty((len(device_ids), *self.host_pool.shape[1:]), dtype=torch.uint8,
                              device=self.device)
        for start, first, length in _runs(host_ids):
            staging[start:start + length].copy_(self.host_pool[first:first + length],
                                                non_blocking=True)
        self._k.index_copy_(1, index, staging[:, 0].transpose(0, 1))
        self._v.index_copy_(1, index, staging[:, 1].transpose(0, 1))
