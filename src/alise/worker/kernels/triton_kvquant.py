"""Fused group-wise KV quantization for paused jobs, as Triton kernels (CUDA only).

The same format as :class:`alise.worker.model.kv_offload.KvCodec` (the torch reference, and the
path on the CPU): per (layer, K/V) one byte stream ``codes | scales | zeros`` with groups of
``G`` consecutive channels of one token and one head, int8 or int4 (two codes a byte, the even
channel in the low nibble), asymmetric, fp16 scale and zero per group.

The torch codec needs the job's blocks gathered into a contiguous float32 copy, several
elementwise passes, a concatenation and a padded scatter. Here:

- :func:`quantize_pages` reads the job's pages *in place* through its block table (one read of
  the full-precision KV) and writes the stream into a contiguous buffer (one write of 9/16 or
  5/16 of it); the caller scatters that buffer into the blocks the job keeps. Reading and
  writing the same blocks in one launch would race (the stream of block ``i`` lands on bytes
  that a later block's program still has to read), hence the buffer.
- :func:`dequantize_pages` reads a stream (gathered from the kept blocks) and writes the
  full-precision values straight into the job's pages through its new block table.

Rounding matches the reference bit for bit: exact min/max, IEEE division (``div_rn``), round
half to even, fp16 round to nearest even; the codes and the scale/zero bytes equal the
reference's (tests/gpu/test_gpu_kv_quant.py checks it). Dequantized values may differ from the
reference in the last bit of the cache dtype: the compiler may fuse ``code * scale + zero``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image has no Triton; the torch codec serves there
    triton = None
    tl = None

#: Groups a program handles.
ROWS = 64


def is_available(device: torch.device) -> bool:
    """Triton is importable and ``device`` is a CUDA device."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        f = tl.floor(x)
        d = x - f
        odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 when f is odd
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))

    @triton.jit
    def _quantize_kernel(src_ptr, table_ptr, out_ptr, out16_ptr, layer_stride, block_stride,
                         out_row_bytes, code_bytes, num_groups,
                         GROUPS_PER_BLOCK: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                         ROWS: tl.constexpr):
        layer = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        valid = rows < num_groups
        block = tl.load(table_ptr + rows // GROUPS_PER_BLOCK, mask=valid, other=0).to(tl.int64)
        base = layer * layer_stride + block * block_stride + (rows % GROUPS_PER_BLOCK) * G
        cols = tl.arange(0, G)
        x = tl.load(src_ptr + base[:, None] + cols[None, :], mask=valid[:, None], other=0.0)
        x = x.to(tl.float32)
        levels: tl.constexpr = (1 << BITS) - 1
        lo = tl.minimum(tl.maximum(tl.min(x, axis=1), -65504.0), 65504.0)
        hi = tl.minimum(tl.maximum(tl.max(x, axis=1), -65504.0), 65504.0)
        zero = lo.to(tl.float16)
        scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, levels, tl.float32)).to(tl.float16)
        scale = tl.where(scale > 0, scale, 1.0)
        q = tl.math.div_rn(x - zero.to(tl.float32)[:, None], scale.to(tl.float32)[:, None])
        q = tl.minimum(tl.maximum(_round_half_even(q), 0.0), levels * 1.0)
        q = q.to(tl.int32)
        row_out = layer * out_row_bytes
        if BITS == 8:
            tl.store(out_ptr + row_out + rows[:, None] * G + cols[None, :], q.to(tl.uint8),
                     mask=valid[:, None])
        else:
            even, odd = tl.split(tl.reshape(q, (ROWS, G // 2, 2)))
            packed = (even | (odd << 4)).to(tl.uint8)
            half = tl.arange(0, G // 2)
            tl.store(out_ptr + row_out + rows[:, None] * (G // 2) + half[None, :], packed,
                     mask=valid[:, None])
        first16 = (row_out + code_bytes) // 2
        tl.store(out16_ptr + first16 + rows, scale, mask=valid)
        tl.store(out16_ptr + first16 + num_groups + rows, zero, mask=valid)

    @triton.jit
    def _dequantize_kernel(stream_ptr, stream16_ptr, table_ptr, dst_ptr, layer_stride,
                           block_stride, in_row_bytes, code_bytes, num_groups,
                           GROUPS_PER_BLOCK: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                           ROWS: tl.constexpr):
        layer = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        valid = rows < num_groups
        row_in = layer * in_row_bytes
        first16 = (row_in + code_bytes) // 2
        scale = tl.load(stream16_ptr + first16 + rows, mask=valid, other=0.0).to(tl.float32)
        zero = tl.load(stream16_ptr + first16 + num_groups + rows, mask=valid, other=0.0)
        zero = zero.to(tl.float32)
        if BITS == 8:
            cols = tl.arange(0, G)
            q = tl.load(stream_ptr + row_in + rows[:, None] * G + cols[None, :],
                        mask=valid[:, None], other=0).to(tl.float32)
        else:
            half = tl.arange(0, G // 2)
            b = tl.load(stream_ptr + row_in + rows[:, None] * (G // 2) + half[None, :],
                        mask=valid[:, None], other=0).to(tl.int32)
            q = tl.reshape(tl.join(b & 15, b >> 4), (ROWS, G)).to(tl.float32)
        x = q * scale[:, None] + zero[:, None]
        block = tl.load(table_ptr + rows // GROUPS_PER_BLOCK, mask=valid, other=0).to(tl.int64)
        base = layer * layer_stride + block * block_stride + (rows % GROUPS_PER_BLOCK) * G
        cols = tl.arange(0, G)
        tl.store(dst_ptr + base[:, None] + cols[None, :], x.to(dst_ptr.dtype.element_ty),
                 mask=valid[:, None])


def stream_bytes(num_groups: int, group: int, bits: int) -> int:
    """Bytes of one layer's stream: codes, then fp16 scales, then fp16 zeros."""
    return num_groups * group * bits // 8 + 4 * num_groups


def quantize_pages(cache: torch.Tensor, table: torch.Tensor, num_blocks: int, group: int,
                   bits: int, out: torch.Tensor) -> None:
    """Encodes the first ``num_blocks`` pages of ``table`` of every layer of ``cache``.

    ``cache [L, num_pages, block_size, heads, dim]`` (contiguous from dim 1; fp16, bf16 or
    fp32); ``table`` int32/int64 on the device; ``out [L, >= stream_bytes]`` uint8 with an even
    row stride; row ``l`` receives layer ``l``'s stream."""
    grid, groups_per_block, num_groups, code_bytes = _layout(cache, out, num_blocks, group, bits)
    _quantize_kernel[grid](cache, table, out, out.view(torch.float16), cache.stride(0),
                           cache.stride(1), out.stride(0), code_bytes, num_groups,
                           GROUPS_PER_BLOCK=groups_per_block, G=group, BITS=bits, ROWS=ROWS)


def dequantize_pages(stream: torch.Tensor, table: torch.Tensor, num_blocks: int, group: int,
                     bits: int, cache: torch.Tensor) -> None:
    """Inverse of :func:`quantize_pages`: writes the values of ``stream [L, >= stream_bytes]``
    into the first ``num_blocks`` pages of ``table`` of ``cache``."""
    grid, groups_per_block, num_groups, code_bytes = _layout(cache, stream, num_blocks, group, bits)
    _dequantize_kernel[grid](stream, stream.view(torch.float16), table, cache, cache.stride(0),
                             cache.stride(1), stream.stride(0), code_bytes, num_groups,
                             GROUPS_PER_BLOCK=groups_per_block, G=group, BITS=bits, ROWS=ROWS)


def _layout(cache: torch.Tensor, stream: torch.Tensor, num_blocks: int, group: int,
            bits: int) -> tuple[tuple[int, int], int, int, int]:
    """Checks the arguments; returns (launch grid, groups a page, groups, code bytes a layer)."""
    groups_per_block = cache[0, 0].numel() // group
    num_groups = num_blocks * groups_per_block
    _check(cache, stream, num_groups, group, bits)
    grid = (triton.cdiv(num_groups, ROWS), cache.shape[0])
    return grid, groups_per_block, num_groups, num_groups * group * bits // 8


def _check(cache: torch.Tensor, stream: torch.Tensor, num_groups: int, group: int,
           bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if cache[0, 0].numel() % group or not cache[0].is_contiguous():
        raise ValueError("each page must be contiguous and hold whole groups")
    if stream.dtype != torch.uint8 or stream.stride(1) != 1 or stream.stride(0) % 2:
        raise ValueError("the stream must be uint8 rows with an even stride")
    if stream.shape[0] != cache.shape[0] or stream.shape[1] < stream_bytes(num_groups, group, bits):
        raise ValueError(f"stream {tuple(stream.shape)} too small for {num_groups} groups")
