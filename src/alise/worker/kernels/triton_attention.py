"""Paged decode attention and the K/V page write as Triton kernels (CUDA only).

Same contracts as the torch reference in :mod:`alise.worker.model.attention`:

- :func:`decode_attention` -- one query token per sequence, ``query [B, num_heads, head_dim]``,
  attends to the first ``context_lens[b]`` positions behind ``block_tables[b]``. It reads the
  pages in place (no gather, no padding to the widest sequence), so a step reads each cached
  K/V byte once. Grouped-query heads share one program: the ``GROUP`` query heads of a KV head
  load its K/V once and score them with one tensor-core ``tl.dot``, the query rows padded to 16
  (for MHA too by default; ``dot_for_mha=False`` uses a register reduction there instead).
- Split-K ("flash-decoding"): when ``batch x kv_heads`` programs would leave SMs idle, each
  sequence's context is cut into ``num_splits`` equal ranges worked on in parallel, and a second
  kernel merges their (max, sum, accumulator) partials -- or, with ``fused_merge``, the last
  range of each sequence and KV head to finish merges them in the same launch (a counter per
  pair, release-acquire ordered, reset by that last program). ``num_splits`` depends only on the batch
  size and head count, never on the context lengths, so a CUDA graph captured for a batch size
  stays valid for any lengths (the ranges are computed on the device from ``context_lens``).
- Sliding windows and soft-caps (Gemma 2): with a ``window``, a sequence's key range starts at
  ``context - window`` (the split ranges divide that range: pages before it are never read);
  with a ``softcap``, each score ``s`` becomes ``softcap * tanh(s / softcap)`` before the softmax.
- :func:`write_kv` -- stores the step's new K/V at their slots; a negative slot is skipped (the
  padding rows of a captured decode graph write nowhere).
- fp8 pages (``float8_e4m3fn``): the write saturates at +-448 and rounds to nearest even, as the
  torch reference does; the decode kernel converts each K/V tile to the query's dtype in
  registers, so it reads half the bytes and computes as with 16-bit pages.

Nothing here allocates on the host or synchronizes: every launch is capturable.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from alise.worker.kernels.triton_unified import LOG2E, check_window_softcap, softcap_factors

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image has no Triton; the torch reference serves there
    triton = None
    tl = None
if triton is not None:
    from alise.worker.kernels.triton_unified import tanh, to_pages

#: Launch configuration of the decode kernel; ALISE_DECODE_KERNEL_CONFIG, a JSON object with some
#: of these keys, overrides it at import. ``block_n`` keys per inner-loop tile; ``num_warps`` and
#: ``num_stages`` as in Triton; ``dot_for_mha`` runs MHA (one query head per KV head) through the
#: tensor-core path too, its single query row padded to 16; ``programs_per_sm`` is the split-K
#: target and ``max_splits`` its cap. Chosen by ``bench/engine.py --tune`` on an H100, 2026-11-25
#: (OPT-13B heads, context 512, graph-timed; docs/benchmarks.md): the padded tensor-core path read
#: the pages at 2.97 TB/s at batch 64; the register-reduction path at best 2.30 (1.44 in the
#: first version's configuration, 64 keys a tile).
DECODE_CONFIG = dict(block_n=128, num_warps=4, num_stages=2, dot_for_mha=True, programs_per_sm=1, max_splits=32)
DECODE_CONFIG.update(json.loads(os.environ.get("ALISE_DECODE_KERNEL_CONFIG", "{}")))


def is_available() -> bool:
    """Triton is importable and a CUDA device is present."""
    return triton is not None and torch.cuda.is_available()


#: Under the Triton interpreter (tests on the CPU) the kernels run on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    """Multiprocessors to fill; 1 off CUDA (the interpreter), where splitting buys nothing."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device.index or 0).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, num_sms: int, programs_per_sm: int | None = None,
                      max_splits: int | None = None) -> int:
    """Split-K ranges per sequence so that about ``programs_per_sm`` programs run per SM.

    Depends on shapes only (see the module docstring): ``batch * num_kv_heads`` programs
    already fill the card from a few dozen sequences on, and then there is no split.
    """
    per_sm = DECODE_CONFIG["programs_per_sm"] if programs_per_sm is None else programs_per_sm
    cap = DECODE_CONFIG["max_splits"] if max_splits is None else max_splits
    programs = max(1, batch * num_kv_heads)
    return max(1, min(cap, -(-per_sm * num_sms // programs)))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_block_n(head_dim: int) -> int:
    """Keys per tile of the decode kernel: the configured ``block_n`` while a K/V tile stays
    within 128 x 128 elements (the shape it was tuned at); fewer keys for wider heads (Gemma's
    256: at 128 keys the soft-capped kernel spills registers on sm_90)."""
    return max(16, min(DECODE_CONFIG["block_n"], 128 * 128 // max(16, _next_pow2(head_dim))))


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr, counters_ptr,
        scale_log2, window, softcap_scale, softcap_log2,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_tb,
        stride_ob, stride_oh,
        num_heads,
        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, USE_DOT: tl.constexpr, FUSED_MERGE: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(lens_ptr + seq).to(tl.int32)
        first = ctx * 0
        if HAS_WINDOW:
            first = tl.maximum(ctx - window, 0)
        per_split = tl.cdiv(tl.cdiv(ctx - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = first + split * per_split
        end = tl.minimum(start + per_split, ctx)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + offs_g
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        table_row = tables_ptr + seq.to(tl.int64) * stride_tb
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < end
            block_ids = tl.load(table_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            kv_off = block_ids * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
            kv_mask = n_mask[:, None] & d_mask[None, :]
            # fp8 pages become the query's dtype in registers (a no-op for pages in that dtype).
            k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            if USE_DOT:
                scores = tl.dot(q, tl.trans(k))
            else:
                scores = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
            if HAS_SOFTCAP:
                scores = tanh(scores * softcap_scale) * softcap_log2
            else:
                scores = scores * scale_log2
            scores = tl.where(n_mask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out_mask = g_mask[:, None] & d_mask[None, :]
        if NUM_SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # Partials laid out [B, num_heads, NUM_SPLITS, HEAD_DIM] and [B, num_heads, NUM_SPLITS, 2].
            row = (seq * num_heads + heads) * NUM_SPLITS + split
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
            tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)
            if FUSED_MERGE:
                # The last split of (seq, kv_head) to finish merges them all: every thread's
                # stores come before the barrier, the release-acquire counter orders them before
                # the last program's reads (L2, not a stale L1), which resets the counter.
                tl.debug_barrier()
                counter = counters_ptr + seq * tl.num_programs(1) + kv_head
                ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                if ticket == NUM_SPLITS - 1:
                    tl.store(counter, 0)
                    m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
                    l_all = tl.zeros([BLOCK_G], tl.float32)
                    acc_all = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
                    # Split 0 holds the first key of the range (context >= 1): the running max
                    # is finite from there on and empty splits (m = -inf) weigh exactly 0.
                    for s in range(NUM_SPLITS):
                        r = (seq * num_heads + heads) * NUM_SPLITS + s
                        m_s = tl.load(part_ml_ptr + r * 2, mask=g_mask, other=float("-inf"), cache_modifier=".cg")
                        l_s = tl.load(part_ml_ptr + r * 2 + 1, mask=g_mask, other=0.0, cache_modifier=".cg")
                        a_s = tl.load(part_acc_ptr + r[:, None] * HEAD_DIM + offs_d[None, :], mask=out_mask,
                                      other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m_all, m_s)
                        alpha = tl.exp2(m_all - m_new)
                        beta = tl.exp2(m_s - m_new)
                        l_all = l_all * alpha + l_s * beta
                        acc_all = acc_all * alpha[:, None] + a_s * beta[:, None]
                        m_all = m_new
                    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                             (acc_all / l_all[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _merge_splits_kernel(
        part_acc_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh, num_heads,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < NUM_SPLITS
        d_mask = offs_d < HEAD_DIM
        rows = (seq * num_heads + head) * NUM_SPLITS + offs_s
        m = tl.load(part_ml_ptr + rows * 2, mask=s_mask, other=float("-inf"))
        sums = tl.load(part_ml_ptr + rows * 2 + 1, mask=s_mask, other=0.0)
        acc = tl.load(part_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        # Split 0 always holds the first key (context >= 1), so m_max is finite and empty
        # splits (m = -inf) weigh exactly 0.
        m_max = tl.max(m, axis=0)
        w = tl.exp2(m - m_max)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(sums * w, axis=0)
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=d_mask)

    @triton.jit
    def _write_kv_kernel(
        key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
        NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        FP8: tl.constexpr,
    ):
        token = tl.program_id(0)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot >= 0:
            offs_h = tl.arange(0, BLOCK_H)
            offs_d = tl.arange(0, BLOCK_D)
            mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
            dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
            k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
            tl.store(k_cache_ptr + dst, to_pages(k, k_cache_ptr, FP8), mask=mask)
            v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
            tl.store(v_cache_ptr + dst, to_pages(v, v_cache_ptr, FP8), mask=mask)


#: Split counters of the fused merge, per device; every step leaves them at zero.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MAX_COUNTERS = 1 << 16


def _counters(device: torch.device, needed: int) -> torch.Tensor:
    if needed > _MAX_COUNTERS:
        raise ValueError(f"the fused merge counts at most {_MAX_COUNTERS} (sequence, KV head) pairs, got {needed}")
    if device not in _COUNTERS:  # allocated at the first (warm-up) call, never inside a graph capture
        _COUNTERS[device] = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     num_splits: int | None = None, out: torch.Tensor | None = None,
                     fused_merge: bool = False, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """Triton version of :func:`alise.worker.model.attention.decode_attention` (same arguments and result).

    ``block_tables [B, width]`` may be wider than any context (a graph's static width): only the
    pages a sequence's context (its last ``window`` keys, with a window) covers are read.
    ``context_lens[b]`` must be >= 1. ``fused_merge``: with split-K, the last split of each
    (sequence, KV head) merges the partials in the same launch instead of a second kernel.
    """
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV heads")
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("key/value pages must share strides with unit stride on head_dim, and so must query")
    if block_tables.stride(-1) != 1 or context_lens.stride(-1) != 1:
        raise ValueError("block_tables rows and context_lens must be contiguous")
    check_window_softcap(window, softcap)
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, _num_sms(query.device))
    if out is None:
        out = torch.empty(batch, num_heads, head_dim, dtype=query.dtype, device=query.device)
    config = DECODE_CONFIG
    block_d = max(16, _next_pow2(head_dim))
    use_dot = group > 1 or bool(config["dot_for_mha"])
    block_g = max(16, _next_pow2(group)) if use_dot else 1
    if num_splits > 1:
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out  # unused
    fused_merge = fused_merge and num_splits > 1
    counters = _counters(query.device, batch * num_kv_heads) if fused_merge else context_lens  # else unused
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, context_lens, out, part_acc, part_ml, counters,
        scale * LOG2E, window or 0, *softcap_factors(scale, softcap),
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_heads,
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=decode_block_n(head_dim), NUM_SPLITS=num_splits, USE_DOT=use_dot, FUSED_MERGE=fused_merge,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if num_splits > 1 and not fused_merge:
        _merge_splits_kernel[(batch, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, BLOCK_S=_next_pow2(num_splits),
            num_warps=4,
        )
    return out


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Triton version of :func:`alise.worker.model.attention.write_kv`; rows with a negative slot are skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if (key_cache.stride() != value_cache.stride() or key.stride(-1) != 1 or value.stride(-1) != 1
            or key_cache.stride(0) != key_cache.shape[1] * key_cache.stride(1)):
        raise ValueError("key/value need unit stride on head_dim; pages equal strides, blocks contiguous")
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, BLOCK_H=_next_pow2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_D=_next_pow2(head_dim), FP8=key_cache.dtype == torch.float8_e4m3fn, num_warps=4,
    )

