"""The bytes of KV moves: quantize in place (int8 / int4), swap to a host pool and back.

:class:`TorchKvMover` is the ``KvMover`` of ``alise.worker.kv_manager``, which owns the block
ids, checks every command and decides what to refuse; this module only moves bytes.

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
the blocks it keeps; an fp8 cache (1 byte a value) would need 18/16 (int8) and 10/16 (int4)
of its blocks, so the KV manager refuses both there (the job is dropped and recomputed) and
only the host moves apply. Dequantizing allocates ``n - m`` blocks again and writes the values
back in full precision. Why G = 32: the scale/zero overhead is 12.5 % of an int8 payload
and 25 % of an int4 one, and 32 channels is the granularity at which int4 KV keeps the
model's logits within a few per cent (KIVI-style; figures in tests/unit/test_kv_quant.py).
On CUDA with Triton, quantizing from full precision and dequantizing run as fused kernels
(:mod:`alise.worker.kernels.triton_kvquant`: the pages are read in place, the same bytes come out);
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

import torch

from alise.core.blocks import QUANTIZED_FRACTION
from alise.worker.kernels import triton_kvquant
from alise.worker.model.kv_cache import KVCache, is_fp8

GROUP_SIZE = 32
#: Bound on the device memory a move borrows for staging and dequantized values.
STAGING_BYTES = 256 << 20



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


class _CudaReady:
    """A copy on the side stream, marked by a CUDA event."""

    def __init__(self, event) -> None:
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class TorchKvMover:
    """The bytes of the KV moves (``alise.worker.kv_manager.KvMover``) over a :class:`KVCache`."""

    def __init__(self, cache: KVCache, num_host_blocks: int) -> None:
        self.cache = cache
        self.codec = KvCodec(cache)
        self.device = cache.key_cache.device
        self.is_cuda = self.device.type == "cuda"
        self.host_pool: torch.Tensor | None = None
        if num_host_blocks:
            layers = cache.shape.num_layers
            self.host_pool = torch.empty((num_host_blocks, 2, layers, self.codec.chunk_bytes),
                                         dtype=torch.uint8, pin_memory=self.is_cuda)
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        #: Quantize / dequantize with the Triton kernels (CUDA), else the torch codec.
        self.fused = triton_kvquant.is_available(self.device)
        self._k = _as_bytes(cache.key_cache)
        self._v = _as_bytes(cache.value_cache)

    def synchronize(self) -> None:
        """Waits for every copy (tests, shutdown)."""
        if self.stream is not None:
            self.stream.synchronize()

    def wait_ready(self, ready: _CudaReady) -> None:
        torch.cuda.current_stream(self.device).wait_event(ready.event)

    # ----------------------------------------------------------------- quantization

    def quantize_refusal(self, bits: int) -> str | None:
        if self.codec.fits(bits):
            return None
        needed = self.codec.stream_bytes(1, bits) / self.codec.chunk_bytes
        pages = "fp8 pages" if is_fp8(self.cache.dtype) else f"{8 * self.codec.itemsize}-bit pages"
        return (f"int{bits} groups of {self.codec.group} channels with fp16 scales take {needed:.3g} of the "
                f"blocks of {pages}; swap or drop instead")

    def quantize(self, table: list[int], num_full: int, keep: int, from_bits: int, to_bits: int) -> None:
        if self.fused and from_bits == 16:
            self._quantize_fused(table, num_full, keep, to_bits)
            return
        for first, last in self._layer_chunks(num_full):
            for raw in (self._k, self._v):
                values = self._read(raw, table, first, last, num_full, from_bits)
                self._write_stream(raw, table[:keep], first, last, self.codec.encode(values, to_bits))

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

    def dequantize(self, kept: list[int], table: list[int], num_full: int, bits: int) -> None:
        if self.fused:
            kept_index = torch.tensor(kept, dtype=torch.int64, device=self.device)
            index = torch.tensor(table, dtype=torch.int64, device=self.device)
            for first, last in self._layer_chunks(num_full, work_bytes_per_value=self.codec.itemsize):
                for cache, raw in ((self.cache.key_cache, self._k), (self.cache.value_cache, self._v)):
                    stream = raw[first:last].index_select(1, kept_index).view(last - first, -1)
                    triton_kvquant.dequantize_pages(stream, index, num_full, self.codec.group, bits,
                                                    cache[first:last])
            return
        index = torch.tensor(table, dtype=torch.int64, device=self.device)
        for first, last in self._layer_chunks(num_full):
            for cache, raw in ((self.cache.key_cache, self._k), (self.cache.value_cache, self._v)):
                values = self._read(raw, kept, first, last, num_full, bits)
                cache[first:last].index_copy_(1, index, values)

    def _read(self, raw: torch.Tensor, table: list[int], first: int, last: int,
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

    def copy_out(self, device_ids: list[int], host_ids: list[int]) -> _CudaReady | None:
        return self._copy(device_ids, host_ids, to_host=True)

    def copy_in(self, host_ids: list[int], device_ids: list[int]) -> _CudaReady | None:
        return self._copy(device_ids, host_ids, to_host=False)

    def _copy(self, device_ids: list[int], host_ids: list[int], *, to_host: bool) -> _CudaReady | None:
        """Copies blocks between the device cache and the host pool; returns what marks
        completion (None on the CPU, where the copy is done on return)."""
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
        return _CudaReady(event)

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
