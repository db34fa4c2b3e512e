"""Fused per-token kernels of a decoder layer (Triton): residual add + norm, rotary + page write,
and a skinny matmul with its epilogue.

Each replaces a handful of small launches that weigh on a decode step (one token per sequence:
every kernel is tiny and launch-bound even inside a CUDA graph):

- :func:`add_norm` -- ``hidden + delta`` (stored: the next residual) and its LayerNorm or
  RMSNorm, one pass over each row. Rounding follows transformers: the sum is rounded to the model
  dtype before the norm reads it; statistics in float32; Llama's RMSNorm casts to the dtype
  before the weight multiplies, Gemma's (``rms_unit_offset``) multiplies by ``1 + weight`` in
  float32 and rounds once.
- :func:`rope_write_kv` -- rotary positions (rotate-half form) on the query and key heads of one
  token, the rotated query to a new tensor and the rotated key plus the value straight into the
  token's page slot (a negative slot writes nowhere, like ``write_kv``). Bit for bit the torch
  rotation: each product rounded to the dtype, then their sum (see :data:`ROPE_LAUNCH`).
- :func:`act_mul` -- the gated activation ``act(gate) * up`` (SiLU, or Gemma's GELU-tanh) of
  the fused gate/up output, one pass instead of two kernels and a temporary.
- :func:`skinny_linear` -- ``x @ weight.T (+ bias) (ReLU)`` for few rows: a program per
  ``BLOCK_N`` output features streams its weight rows once, so a decode step reads each weight
  byte once, with the bias and activation in the epilogue. Whether it beats
  cuBLAS on a shape is measured at start-up (``alise.worker.model.tuning``).

Nothing here synchronizes or allocates on the host beyond the outputs: every launch is capturable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image has no Triton; torch ops serve there
    triton = None
    tl = None
if triton is not None:
    from alise.worker.kernels.triton_unified import tanh, to_pages

#: Under the Triton interpreter (tests on the CPU) a bf16 ``tl.dot`` computes garbage (Triton
#: 3.6), so the matmul upcasts its operands to float32 there.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch configuration of :func:`skinny_linear`. ``vector``: one row only, multiply-adds into
    a ``[block_n, block_k]`` register tile reduced once at the end, no tensor cores (a GEMV)."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    vector: bool = False


#: Timed at start-up against cuBLAS per weight shape and row bucket (alise.worker.model.tuning); the
#: ``vector`` ones only for one row.
SKINNY_CANDIDATES = (SkinnyConfig(32, 256, 4, 3), SkinnyConfig(16, 512, 4, 3), SkinnyConfig(64, 128, 4, 4),
                     SkinnyConfig(32, 512, 8, 3), SkinnyConfig(16, 256, 4, 4, vector=True),
                     SkinnyConfig(8, 512, 4, 3, vector=True))

#: Launch options of the rotary kernel. Compiled, its products of two 16-bit values become 16-bit
#: multiplies (exact: the float32 product rounded once), and with floating-point fusion on, one of
#: each ``round(a * c) - round(b * s)`` pair merges with the difference into a multiply-add that
#: skips that product's rounding: the rotated query and key then differ from torch's by an ulp (far
#: more where the two products cancel), each layer's K/V inherit it, and on fp8 pages it moves
#: keys to the neighbouring e4m3 code. So no fusion here (tests/unit/test_rope_kernel_sm90.py).
ROPE_LAUNCH = dict(num_warps=4, enable_fp_fusion=False)

#: Most rows :func:`skinny_linear` takes (decode batches up to 16; larger ones go to cuBLAS,
#: whose tiles use the tensor cores better). The candidates' tiles fit shared memory up to here.
MAX_SKINNY_ROWS = 16


if triton is not None:

    @triton.jit
    def _add_norm_kernel(x_ptr, delta_ptr, weight_ptr, bias_ptr, sum_ptr, out_ptr, eps, n_cols,
                         stride_x, stride_d, stride_s, stride_o,
                         HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                         UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
        h = x.to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            var = tl.sum(h * h, axis=0) / n_cols
            if UNIT_OFFSET:  # Gemma: (1 + weight) in float32, one rounding at the end
                y = h * tl.rsqrt(var + eps) * (1.0 + w)
            else:  # rounded to the dtype before the weight multiplies, as LlamaRMSNorm does
                y = w * (h * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            mean = tl.sum(h, axis=0) / n_cols
            centered = tl.where(mask, h - mean, 0.0)
            var = tl.sum(centered * centered, axis=0) / n_cols
            y = centered * tl.rsqrt(var + eps) * w
            if HAS_BIAS:
                y += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                           stride_ot, stride_oh, stride_cs, stride_ch,
                           NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_KV: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                           FP8: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_HALF)
        d_mask = offs < HALF
        cos1 = tl.load(cos_ptr + token * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + token * stride_ct + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + token * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + token * stride_ct + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)

        heads = tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < NUM_HEADS) & d_mask[None, :]
        src = q_ptr + token * stride_qt + heads[:, None] * stride_qh + offs[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = q_out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs[None, :]
        ty = q_out_ptr.dtype.element_ty
        # Each product rounded to the dtype before the sum, as the torch form computes it (no
        # multiply-add may skip a rounding: ROPE_LAUNCH).
        tl.store(dst, ((x1 * cos1[None, :]).to(ty).to(tl.float32) - (x2 * sin1[None, :]).to(ty).to(tl.float32))
                 .to(ty), mask=mask)
        tl.store(dst + HALF, ((x2 * cos2[None, :]).to(ty).to(tl.float32)
                              + (x1 * sin2[None, :]).to(ty).to(tl.float32)).to(ty), mask=mask)

        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot >= 0:
            kv_heads = tl.arange(0, BLOCK_KV)
            kv_mask = (kv_heads[:, None] < NUM_KV_HEADS) & d_mask[None, :]
            ksrc = k_ptr + token * stride_kt + kv_heads[:, None] * stride_kh + offs[None, :]
            k1 = tl.load(ksrc, mask=kv_mask, other=0.0).to(tl.float32)
            k2 = tl.load(ksrc + HALF, mask=kv_mask, other=0.0).to(tl.float32)
            kdst = k_cache_ptr + slot * stride_cs + kv_heads[:, None] * stride_ch + offs[None, :]
            # The rotated key is rounded to the model's dtype, then to the pages' (fp8 or the same).
            k_lo = ((k1 * cos1[None, :]).to(ty).to(tl.float32) - (k2 * sin1[None, :]).to(ty).to(tl.float32)).to(ty)
            k_hi = ((k2 * cos2[None, :]).to(ty).to(tl.float32) + (k1 * sin2[None, :]).to(ty).to(tl.float32)).to(ty)
            tl.store(kdst, to_pages(k_lo, k_cache_ptr, FP8), mask=kv_mask)
            tl.store(kdst + HALF, to_pages(k_hi, k_cache_ptr, FP8), mask=kv_mask)
            vsrc = v_ptr + token * stride_vt + kv_heads[:, None] * stride_vh + offs[None, :]
            vdst = v_cache_ptr + slot * stride_cs + kv_heads[:, None] * stride_ch + offs[None, :]
            tl.store(vdst, to_pages(tl.load(vsrc, mask=kv_mask), v_cache_ptr, FP8), mask=kv_mask)
            tl.store(vdst + HALF, to_pages(tl.load(vsrc + HALF, mask=kv_mask), v_cache_ptr, FP8), mask=kv_mask)

    @triton.jit
    def _act_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        ty = out_ptr.dtype.element_ty
        if GELU_TANH:
            act = 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
        else:
            act = gate / (1.0 + tl.exp(-gate))
        act = act.to(ty).to(tl.float32)  # rounded as the torch activation's output is
        tl.store(out_ptr + row * stride_o + cols, (act * up).to(ty), mask=mask)

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, VECTOR: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        if VECTOR:  # one row (BLOCK_M == 1): multiply-adds into a register tile, one reduction
            part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_mask = (k0 + offs_k) < K
                x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                w = tl.load(w_rows + k0 + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                part += w.to(tl.float32) * x[None, :]
            acc = tl.sum(part, axis=1)[None, :]
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_mask = (k0 + offs_k) < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + offs_k[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_rows + k0 + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                if DOT_F32:
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


NORM_KINDS = ("layer", "rms", "rms_unit_offset")


def add_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, *, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, norm(s))`` with ``s = hidden + delta`` (``s = hidden`` when ``delta`` is None), rows of
    ``[T, hidden_size]``; ``kind``: "layer" (LayerNorm with ``weight`` and ``bias``), "rms"
    (Llama's RMSNorm) or "rms_unit_offset" (Gemma's)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    num_rows, n_cols = hidden.shape
    if hidden.stride(-1) != 1 or (delta is not None and delta.stride(-1) != 1):
        raise ValueError("add_norm needs rows with unit stride")
    total = torch.empty_like(hidden) if delta is not None else hidden
    out = torch.empty_like(hidden)
    if num_rows == 0:
        return total, out
    block = _next_pow2(n_cols)
    _add_norm_kernel[(num_rows,)](
        hidden, delta if delta is not None else hidden, weight, bias if bias is not None else weight, total, out,
        eps, n_cols, hidden.stride(0), delta.stride(0) if delta is not None else 0, total.stride(0), out.stride(0),
        HAS_DELTA=delta is not None, HAS_BIAS=bias is not None, RMS=kind != "layer",
        UNIT_OFFSET=kind == "rms_unit_offset", BLOCK=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return total, out


def rope_write_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary positions on ``query [T, heads, dim]`` and ``key [T, kv_heads, dim]`` with per-token
    ``cos``/``sin [T, dim]``; the rotated key and ``value`` go into their page slots (in the pages'
    dtype, fp8 as ``alise.worker.model.kv_cache.to_pages`` stores it). Returns the
    rotated query (a new contiguous tensor)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if head_dim % 2 or query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("rope_write_kv needs an even head_dim with unit stride")
    if key_cache.stride() != value_cache.stride() or key_cache.stride(0) != key_cache.shape[1] * key_cache.stride(1):
        raise ValueError("key/value pages must share strides, blocks contiguous")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    cos, sin = cos.reshape(num_tokens, head_dim), sin.reshape(num_tokens, head_dim)
    half = head_dim // 2
    _rope_write_kernel[(num_tokens,)](
        query, key, value, cos, sin, slot_mapping, out, key_cache, value_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), out.stride(0), out.stride(1), key_cache.stride(1), key_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, BLOCK_H=_next_pow2(num_heads),
        BLOCK_KV=_next_pow2(num_kv_heads), HALF=half, BLOCK_HALF=_next_pow2(half),
        FP8=key_cache.dtype == torch.float8_e4m3fn, **ROPE_LAUNCH,
    )
    return out


def act_mul(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up [T, 2 * I]`` (gate first, as the fused projection lays
    them out), ``activation`` "silu" or "gelu_tanh"; returns ``[T, I]``."""
    num_rows, width = gate_up.shape
    if width % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"act_mul needs [T, 2 * I] rows with unit stride, got {tuple(gate_up.shape)}")
    if activation not in ("silu", "gelu_tanh"):
        raise ValueError(f"activation must be 'silu' or 'gelu_tanh', got {activation!r}")
    out = torch.empty(num_rows, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    if num_rows:
        block = 1024
        _act_mul_kernel[(num_rows, triton.cdiv(width // 2, block))](
            gate_up, out, width // 2, gate_up.stride(0), out.stride(0), GELU_TANH=activation == "gelu_tanh",
            BLOCK=block, num_warps=4)
    return out


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, relu: bool = False,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T`` (+ ``bias``) (ReLU) for ``M <= MAX_SKINNY_ROWS``; accumulates
    in float32, returns ``[M, N]`` in ``x``'s dtype."""
    config = config or SKINNY_CANDIDATES[0]
    num_rows, k = x.shape
    n = weight.shape[0]
    if num_rows > MAX_SKINNY_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_SKINNY_ROWS} rows, got {num_rows}")
    if config.vector and num_rows != 1:
        raise ValueError(f"a vector configuration takes one row, got {num_rows}")
    if weight.shape[1] != k or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"shapes {tuple(x.shape)} x {tuple(weight.shape)}.T do not chain with unit strides")
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, out, num_rows, n, k, x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, RELU=relu,
        BLOCK_M=1 if config.vector else max(16, _next_pow2(num_rows)), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, DOT_F32=INTERPRETED and x.dtype == torch.bfloat16, VECTOR=config.vector,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
