"""One paged-attention launch for a whole step: decodes and prefill chunks together (Triton).

A step's ``T`` query rows are the flattened tokens of ``S`` sequences: sequence ``s`` owns rows
``[query_start[s], query_start[s + 1])`` and has ``seq_lens[s]`` keys cached (its own new ones
included: the page write runs first), so its query ``i`` of ``n`` sits at position
``seq_lens[s] - n + i`` and attends causally to keys ``0 ..`` that position, read in place
through ``block_tables[s]``. Decodes are sequences of one row; a fresh prompt or a later chunk
(any ``start_pos``) is just a sequence of more rows.

The grid is static in ``(T, S)``: program ``(q, kv_head)`` takes query tile ``q`` of
``T // BLOCK_Q + S`` and finds its sequence on the device by a binary search over
``query_start[s] // BLOCK_Q + s`` (sequence ``s``'s first tile); tiles past a sequence's rows
return at once. So one CUDA graph captured for ``(T, S)`` serves any split of ``T`` rows among
at most ``S`` sequences, with any lengths; padding sequences have no rows (``query_start``
repeats), padding rows belong to no sequence and are left unwritten.

With a sliding ``window`` a query at position ``p`` sees keys ``(p - window, p]`` and a tile's
key loop starts at its first query's window (pages before it are never read); with a
``softcap`` each score ``s`` becomes ``softcap * tanh(s / softcap)`` before the softmax.

A tile holds ``BLOCK_Q`` query tokens times the ``GROUP`` query heads of one KV head
(``BLOCK_M = BLOCK_Q * GROUP`` rows, a power of two), so grouped-query heads load their K/V once
and score them with one tensor-core ``tl.dot``. Softmax is the online (flash) form in base 2.
Pages may be fp8 (``float8_e4m3fn``): each K/V tile is converted to the query's dtype in registers.

Nothing here synchronizes or allocates on the host: the launch is capturable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image has no Triton; the torch reference serves there
    triton = None
    tl = None

#: Under the Triton interpreter (tests on the CPU) a bf16 ``tl.dot`` computes garbage (Triton
#: 3.6: numpy has no bf16), so the kernel upcasts its dot operands to float32 there.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class UnifiedConfig:
    """Launch configuration: ``block_m`` tile rows (query tokens x grouped heads), ``block_n``
    keys per inner tile, Triton's ``num_warps`` and ``num_stages``."""

    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def block_q(self, group: int) -> int:
        """Query tokens a tile holds for ``group`` query heads per KV head."""
        return max(1, self.block_m // group)


#: The candidates the runner times at start-up (alise.worker.model.tuning); the first is the default.
CANDIDATES = (UnifiedConfig(16, 64, 4, 2), UnifiedConfig(32, 64, 4, 2), UnifiedConfig(64, 64, 4, 2),
              UnifiedConfig(64, 32, 4, 3), UnifiedConfig(128, 64, 8, 2), UnifiedConfig(16, 128, 4, 2))


LOG2E = 1.4426950408889634


def check_window_softcap(window: int | None, softcap: float | None) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


def softcap_factors(scale: float, softcap: float | None) -> tuple[float, float]:
    """``(scale / softcap, softcap * log2(e))``: a kernel's capped base-2 score of a raw dot
    product ``d`` is ``tanh(d * first) * second``; ``(0, 0)`` without a cap (unused then)."""
    if softcap is None:
        return 0.0, 0.0
    return scale / softcap, softcap * LOG2E


def num_query_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Grid size along the query axis: enough tiles for any split of the rows among the sequences."""
    return num_tokens // block_q + num_seqs


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def tanh(x):
        """tanh from one exp of a non-positive argument: no overflow, exact sign."""
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def to_pages(x, pages_ptr, FP8: tl.constexpr):
        """``x`` in the dtype of ``pages_ptr``; fp8 saturates at +-448 first (as
        ``alise.worker.model.kv_cache.to_pages``: never NaN), then rounds to nearest even."""
        if FP8:
            x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
        return x.to(pages_ptr.dtype.element_ty)

    @triton.jit
    def _find_seq(query_start_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
        """The last sequence whose first tile is <= ``tile``."""
        # Both bounds start as int32 tensors: a Python 0, or ``num_seqs`` specialized to a
        # constant when it is 1, would change type when the loop reassigns them.
        lo = tile * 0
        hi = lo + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first_tile = tl.load(query_start_ptr + mid).to(tl.int32) // BLOCK_Q + mid
            if first_tile <= tile:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _unified_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_lens_ptr, query_start_ptr,
        scale_log2, num_seqs, window, softcap_scale, softcap_log2,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_kt, stride_kh, stride_tb,
        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = _find_seq(query_start_ptr, tile, num_seqs, BLOCK_Q)
        q_first = tl.load(query_start_ptr + seq).to(tl.int32)
        q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_first
        local = tile - (q_first // BLOCK_Q + seq)
        if local * BLOCK_Q < q_len:
            ctx = tl.load(seq_lens_ptr + seq).to(tl.int32)
            offs_m = tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            offs_n = tl.arange(0, BLOCK_N)
            q_idx = local * BLOCK_Q + offs_m // GROUP
            heads = kv_head * GROUP + offs_m % GROUP
            row_mask = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)
            d_mask = offs_d < HEAD_DIM
            q_pos = ctx - q_len + q_idx
            rows = (q_first + q_idx).to(tl.int64)
            q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            # Keys up to the tile's last query (the longest causal row). Without a window key 0 is
            # in every row's range, so each row's running max is finite after the first key tile;
            # with one, the loop starts at the first query's window and a row may see no key of
            # the first tiles (its max stays -inf: see the guard below).
            kv_end = ctx - q_len + tl.minimum((local + 1) * BLOCK_Q, q_len)
            kv_begin = kv_end * 0
            if HAS_WINDOW:
                kv_begin = tl.maximum(ctx - q_len + local * BLOCK_Q - window + 1, 0)
            table_row = tables_ptr + seq.to(tl.int64) * stride_tb
            for n0 in range(kv_begin, kv_end, BLOCK_N):
                pos = n0 + offs_n
                n_mask = pos < kv_end
                block_ids = tl.load(table_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
                kv_off = block_ids * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
                kv_mask = n_mask[:, None] & d_mask[None, :]
                # fp8 pages become the query's dtype in registers (a no-op for pages in that dtype).
                k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
                v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
                if DOT_F32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                if HAS_SOFTCAP:
                    scores = tanh(tl.dot(q, tl.trans(k)) * softcap_scale) * softcap_log2
                else:
                    scores = tl.dot(q, tl.trans(k)) * scale_log2
                seen = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
                if HAS_WINDOW:
                    seen = seen & (pos[None, :] > q_pos[:, None] - window)
                scores = tl.where(seen, scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                m_ref = m_new
                if HAS_WINDOW:  # a row that has seen no key yet weighs 0 (exp2(-inf - 0)), never NaN
                    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_ref)
                p = tl.exp2(scores - m_ref[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            out = acc / l_i[:, None]
            tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def unified_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                      scale: float, config: UnifiedConfig | None = None, *,
                      out: torch.Tensor | None = None, window: int | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """Causal paged attention of every query row of a step (see the module docstring).

    ``query [T, num_heads, head_dim]``; ``key_cache``/``value_cache [num_blocks, block_size,
    num_kv_heads, head_dim]`` with the step's K/V already written; ``block_tables [S, width]``,
    ``seq_lens [S]`` (keys per sequence, >= its rows), ``query_start [S + 1]`` (row offsets,
    non-decreasing, ``query_start[S] <= T``). Returns ``out [T, num_heads, head_dim]``; rows of no
    sequence are left as they were. ``window``/``softcap``: see the module docstring.
    """
    check_window_softcap(window, softcap)
    config = config or CANDIDATES[0]
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = block_tables.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if group > config.block_m:
        raise ValueError(f"block_m {config.block_m} cannot hold the {group} query heads of a KV head")
    if query_start.shape[0] != num_seqs + 1 or seq_lens.shape[0] != num_seqs:
        raise ValueError(f"query_start needs {num_seqs + 1} entries and seq_lens {num_seqs}, got "
                         f"{query_start.shape[0]} and {seq_lens.shape[0]}")
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("key/value pages must share strides with unit stride on head_dim, and so must query")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    block_q = config.block_q(group)
    grid = (num_query_tiles(num_tokens, num_seqs, block_q), num_kv_heads)
    _unified_kernel[grid](
        query, key_cache, value_cache, out, block_tables, seq_lens, query_start,
        scale * LOG2E, num_seqs, window or 0, *softcap_factors(scale, softcap),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_Q=block_q, BLOCK_M=config.block_m, HEAD_DIM=head_dim,
        BLOCK_D=max(16, _next_pow2(head_dim)), BLOCK_N=config.block_n,
        DOT_F32=INTERPRETED and query.dtype == torch.bfloat16,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
