"""Paged attention in plain torch: the reference implementation and the CPU path.

A step's tokens are flattened into one batch of ``T`` rows: the tokens of sequence 0, then those of
sequence 1, and so on. Sequence ``s`` feeds tokens at positions ``[start_s, start_s + n_s)`` and
attends causally to positions ``[0, start_s + n_s)``, the earlier ones read from its KV pages.
Each layer first writes the new tokens' K/V into the pages (:func:`write_kv`), then attends:

- sequences feeding one token (decode, or a one-token prefill) go through one batched call,
  :func:`decode_attention`, whose signature is what a fused paged-decode kernel implements;
- longer chunks (a prompt, or a piece of it under chunked prefill) go one sequence at a time through
  :func:`prefill_attention`, with a causal mask offset by the tokens already cached;
- when a step carries several *fresh* prompts (chunks starting at position 0) and
  ``ModelRunner.min_batched_fresh`` allows it (on CUDA: from ``MIN_BATCHED_FRESH``), they go
  through one padded call, :func:`batched_fresh_attention`: on a GPU a step with prefills runs
  eagerly, bound by kernel launches, and each chunk's own call costs a few launches in every
  layer. ``bench/gpu/mixed_steps.py`` on an H200 (OPT-13B, 58 decode rows): 4 prompts of 50
  36.1 ms batched vs 43.6 one by one, 8 prompts of 32 23.3 vs 27.7. On the CPU the padded
  call measured slower than the loop, so there it is off.

Where the runner's kernel plan has the unified kernel (CUDA), a step that is not all decodes
instead runs as one call over every sequence (:class:`UnifiedStep`; the contract and its
reference are :func:`unified_attention`, the kernel :mod:`alise.worker.kernels.triton_unified`), every
key read from the pages.

Pages may be fp8 (``alise.worker.model.kv_cache``): every path that reads them converts the keys and
values to the query's dtype first. Every query attends to every key and value as the pages hold
it, its own chunk's included (the kernels read them all from the pages): a fresh chunk, which
reads no page, attends to its own K/V rounded as the page write rounds them (:func:`as_paged`).

A fresh chunk (no page read) attends through torch's flash SDPA, or, where the kernel plan measured
it faster, through cuDNN's SDPA on its rows padded to one of a few lengths
(:func:`padded_causal_attention`): cuDNN builds a plan per shape, and padding keeps the shapes few.

Everything layer-independent (slots, positions, padded block tables, masks) is computed once per
step in :func:`build_attention_metadata` and shared by all layers.

Per layer, three things may differ from plain causal attention (every function here and every
backend takes them): ``scale`` (the logits' multiplier; ``head_dim ** -0.5`` unless the model
says otherwise), ``window`` (sliding-window attention: a query at position ``p`` sees the keys
at positions ``(p - window, p]``; None: all of ``[0, p]``) and ``softcap`` (the logits become
``tanh(s / softcap) * softcap`` before the softmax, as Gemma 2 does; None: unchanged).

The page write, the decode attention and the unified attention are pluggable
(:class:`AttentionBackend`): this module's torch functions are the reference and the CPU path;
:mod:`alise.worker.kernels.triton_attention` provides fused CUDA kernels with the same contracts.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from alise.worker.model.kv_cache import is_fp8, to_pages


@dataclass(frozen=True)
class PrefillSpan:
    """One multi-token chunk: rows ``[row_start, row_start + num_tokens)`` of the flattened batch."""

    row_start: int
    num_tokens: int
    context_len: int  # start_pos + num_tokens: the keys this chunk attends to
    block_table: torch.Tensor  # [ceil(context_len / block_size)] int64, on device
    mask: torch.Tensor | None  # [num_tokens, context_len] bool (True = attend); None = square causal
    padded_len: int | None = None  # a fresh chunk's length for padded cuDNN SDPA (padded_length); None: flash


@dataclass(frozen=True)
class FreshBatch:
    """Several fresh chunks (``start_pos`` 0) padded to one ``[S, L]`` batch for one attention call."""

    gather: torch.Tensor  # [S * L] int64: the step row feeding each padded slot (pads repeat a real row)
    mask: torch.Tensor  # [S, 1, L, L] bool: key j is seen by query i iff j <= i and j < the chunk's length
    rows: torch.Tensor  # [R] int64: the step rows of the chunks' real tokens
    slots: torch.Tensor  # [R] int64: where each of those rows sits in the flattened padded batch
    num_seqs: int
    max_len: int


#: ``upload(values, dtype)``: host values as a tensor on the device (see build_attention_metadata).
Upload = Callable[[object, torch.dtype], torch.Tensor]

#: Where batching is on: fresh chunks in a step from which they share one padded attention call
#: (fewer would not save launches: the padded call costs about as many as two chunks' own calls).
MIN_BATCHED_FRESH = 3


@dataclass(frozen=True)
class AttentionMetadata:
    """What every layer needs to place and attend the step's ``T`` tokens."""

    positions: torch.Tensor  # [T] int64: each token's position within its sequence
    slot_mapping: torch.Tensor  # [T] int64: where each token's K/V goes in a layer's flattened pages
    prefills: tuple[PrefillSpan, ...]
    decode_rows: torch.Tensor | None  # [B] int64 rows of one-token sequences; None when there are none
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64, padded with block 0 (masked out)
    decode_context_lens: torch.Tensor | None  # [B] int64
    is_all_decode: bool  # decode_rows is exactly 0..T-1, so no gather/scatter is needed
    fresh: FreshBatch | None = None  # fresh chunks batched together (not in ``prefills``)
    unified: UnifiedStep | None = None  # every sequence in one unified-kernel call (then no prefills)
    decode_options: dict | None = None  # decode kernel options (num_splits, fused_merge); None: its defaults


@dataclass(frozen=True)
class UnifiedStep:
    """A step's attention as one call of the unified kernel (alise.worker.kernels.triton_unified)."""

    query_start: torch.Tensor  # [S + 1] int64: first row of each sequence, then the end of the last
    seq_lens: torch.Tensor  # [S] int64: keys each sequence attends to (start_pos + its rows)
    block_tables: torch.Tensor  # [S, width] int64
    config: object = None  # the kernel's launch configuration (triton_unified.UnifiedConfig)


def build_attention_metadata(start_positions: list[int], num_tokens: list[int], block_tables: list[list[int]],
                             *, block_size: int, device: torch.device, min_batched_fresh: int = 0,
                             unified_config: object = None, upload: Upload | None = None,
                             cudnn_fresh_lengths: tuple[int, ...] = ()) -> AttentionMetadata:
    """Metadata for sequences with the given starts, token counts and (validated) block tables.
    ``min_batched_fresh``: batch the fresh chunks when there are at least this many (0: never).
    ``cudnn_fresh_lengths``: the lengths a fresh chunk of more than ``CUDNN_MIN_ROWS`` rows pads
    to for cuDNN SDPA (the kernel plan's; empty: flash SDPA).
    ``unified_config``: a step that is not all decodes runs as one unified-kernel call with it.
    ``upload(values, dtype)``: how the host-built tensors reach ``device`` (default
    ``.to(device)``; an overlapped step passes pinned non-blocking copies,
    ``alise.worker.model.overlap.PinnedUploads``); the tensors are the same either way."""
    put = (lambda t: t.to(device)) if upload is None else (lambda t: upload(t, t.dtype))
    context_lens = [s + n for s, n in zip(start_positions, num_tokens, strict=True)]
    blocks_needed = [-(-c // block_size) for c in context_lens]
    width = max(blocks_needed)
    table = torch.tensor([bt[:k] + [0] * (width - k) for bt, k in zip(block_tables, blocks_needed, strict=True)],
                         dtype=torch.int64)
    # Row -> sequence and position, in plain Python: a few thousand rows at most, and CPU
    # repeat_interleave measured milliseconds a call inside a busy worker.
    seq_of_row: list[int] = []
    position_list: list[int] = []
    row_starts: list[int] = []
    for seq, (start, n) in enumerate(zip(start_positions, num_tokens, strict=True)):
        row_starts.append(len(seq_of_row))
        seq_of_row.extend([seq] * n)
        position_list.extend(range(start, start + n))
    positions = torch.tensor(position_list, dtype=torch.int64)
    slots = table[torch.tensor(seq_of_row, dtype=torch.int64), positions // block_size] * block_size \
        + positions % block_size

    if unified_config is not None and max(num_tokens) > 1:
        query_start = torch.tensor(row_starts + [len(seq_of_row)], dtype=torch.int64)
        # Rows padded to a multiple of 16 blocks: the kernel is compiled per stride alignment, so
        # every step then reuses one build (a new build stalls a step by seconds).
        table = F.pad(table, (0, -width % 16))
        unified = UnifiedStep(query_start=put(query_start), block_tables=put(table),
                              seq_lens=put(torch.tensor(context_lens, dtype=torch.int64)), config=unified_config)
        return AttentionMetadata(positions=put(positions), slot_mapping=put(slots), prefills=(),
                                 decode_rows=None, decode_block_tables=None, decode_context_lens=None,
                                 is_all_decode=False, unified=unified)
    prefills = []
    decode_seqs = []
    fresh_seqs = [s for s, n in enumerate(num_tokens) if n > 1 and start_positions[s] == 0]
    batch_fresh = 0 < min_batched_fresh <= len(fresh_seqs)
    for seq, (row_start, n) in enumerate(zip(row_starts, num_tokens, strict=True)):
        if n == 1:
            decode_seqs.append(seq)
            continue
        if batch_fresh and start_positions[seq] == 0:
            continue
        ctx = context_lens[seq]
        mask = None
        if ctx != n:
            # Query i sits at position ctx - n + i and sees keys 0..ctx - n + i.
            query_pos = torch.arange(ctx - n, ctx, device=device)
            mask = torch.arange(ctx, device=device)[None, :] <= query_pos[:, None]
        prefills.append(PrefillSpan(row_start=row_start, num_tokens=n, context_len=ctx, mask=mask,
                                    block_table=put(table[seq, :blocks_needed[seq]]),
                                    padded_len=padded_length(n, cudnn_fresh_lengths)
                                    if ctx == n and n > CUDNN_MIN_ROWS else None))

    decode_rows = decode_tables = decode_lens = None
    if decode_seqs:
        idx = torch.tensor(decode_seqs, dtype=torch.int64)
        decode_width = max(blocks_needed[s] for s in decode_seqs)
        decode_rows = put(torch.tensor([row_starts[s] for s in decode_seqs], dtype=torch.int64))
        decode_tables = put(table[idx, :decode_width])
        decode_lens = put(torch.tensor([context_lens[s] for s in decode_seqs], dtype=torch.int64))
    fresh = _fresh_batch([row_starts[s] for s in fresh_seqs], [num_tokens[s] for s in fresh_seqs],
                         device, put) if batch_fresh else None
    return AttentionMetadata(positions=put(positions), slot_mapping=put(slots),
                             prefills=tuple(prefills), decode_rows=decode_rows, decode_block_tables=decode_tables,
                             decode_context_lens=decode_lens, is_all_decode=not prefills and fresh is None,
                             fresh=fresh)


def _fresh_batch(row_starts: list[int], lengths: list[int], device: torch.device,
                 put: Callable[[torch.Tensor], torch.Tensor]) -> FreshBatch:
    num_seqs, max_len = len(lengths), max(lengths)
    gather, rows, slots = [], [], []
    for s, (start, n) in enumerate(zip(row_starts, lengths, strict=True)):
        gather.extend(start + min(i, n - 1) for i in range(max_len))
        rows.extend(range(start, start + n))
        slots.extend(range(s * max_len, s * max_len + n))
    lens = put(torch.tensor(lengths, dtype=torch.int64))
    pos = torch.arange(max_len, device=device)
    # A padded query row (i >= n) sees the chunk's real keys only: never an empty row (no NaN).
    mask = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lens[:, None, None])
    as_tensor = lambda xs: put(torch.tensor(xs, dtype=torch.int64))  # noqa: E731
    return FreshBatch(gather=as_tensor(gather), mask=mask[:, None], rows=as_tensor(rows), slots=as_tensor(slots),
                      num_seqs=num_seqs, max_len=max_len)


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store ``key``/``value`` ``[T, num_kv_heads, head_dim]`` at ``slot_mapping`` of one layer's pages,
    in the pages' dtype (fp8: see ``alise.worker.model.kv_cache.to_pages``).

    Rows with a negative slot are skipped (the padding rows of a batch-size bucket)."""
    num_kv_heads, head_dim = key_cache.shape[-2:]
    if slot_mapping.numel() and bool(slot_mapping.min() < 0):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    for pages, rows in ((key_cache, key), (value_cache, value)):
        rows = to_pages(rows, pages.dtype)
        if is_fp8(pages.dtype):  # torch has no fp8 index_copy_: the same bytes, copied as uint8
            pages, rows = pages.view(torch.uint8), rows.view(torch.uint8)
        pages.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, rows)


def window_mask(query_pos: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """``[n, num_keys]`` bool: key ``j`` is seen by the query at ``query_pos[i]`` (causal, and
    within ``window`` when given)."""
    keys = torch.arange(num_keys, device=query_pos.device)[None, :]
    seen = keys <= query_pos[:, None]
    if window is not None:
        seen &= keys > query_pos[:, None] - window
    return seen


def cuts(window: int | None, num_keys: int) -> bool:
    """Whether a window hides any of ``num_keys`` keys from some query (else it changes nothing)."""
    return window is not None and num_keys > window


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *,
           mask: torch.Tensor | None = None, causal: bool = False, softcap: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale [capped], masked) v`` over ``[..., heads, L, dim]`` tensors, the key
    and value with ``kv_heads`` dividing ``heads`` (grouped-query). ``mask`` (bool, True = seen)
    broadcasts to ``[..., heads, Lq, Lk]``; ``causal`` without a mask is the square causal mask.

    Without a soft-cap this is SDPA; with one it is the computation of transformers' eager
    attention (logits, cap, mask, float32 softmax rounded to the dtype, then the values)."""
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale, enable_gqa=True)
    group = query.shape[-3] // key.shape[-3]
    key = key.repeat_interleave(group, dim=-3)
    value = value.repeat_interleave(group, dim=-3)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and causal:
        lq, lk = scores.shape[-2:]
        mask = window_mask(torch.arange(lk - lq, lk, device=scores.device), lk, None)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


def prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_table: torch.Tensor, context_len: int, mask: torch.Tensor | None,
                      scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of one sequence's chunk ``query [n, num_heads, head_dim]`` over its first
    ``context_len`` cached positions (the chunk's own K/V already written). ``mask`` is the
    chunk's causal mask (None: square causal); a ``window`` that cuts replaces it. Returns
    ``[n, heads, dim]``."""
    # index_select, not key_cache[block_table]: advanced indexing on CPU sizes its parallel
    # work by the whole cache and costs milliseconds for a two-block gather.
    key = key_cache.index_select(0, block_table).flatten(0, 1)[:context_len].to(query.dtype)  # [ctx, kv_heads, dim]
    value = value_cache.index_select(0, block_table).flatten(0, 1)[:context_len].to(query.dtype)
    n = query.shape[0]
    if cuts(window, context_len):
        mask = window_mask(torch.arange(context_len - n, context_len, device=query.device), context_len, window)
    out = attend(query.transpose(0, 1).unsqueeze(0), key.transpose(0, 1).unsqueeze(0),
                 value.transpose(0, 1).unsqueeze(0), scale, mask=mask, causal=mask is None, softcap=softcap)
    return out.squeeze(0).transpose(0, 1)


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence, ``query [B, num_heads, head_dim]``, attending to the first
    ``context_lens[b]`` positions behind ``block_tables[b]`` (``[B, max_blocks]``), the last
    ``window`` of them when a window is given. Returns ``[B, heads, dim]``.

    The gather pads every sequence to ``max_blocks * block_size`` keys and masks the tail; a fused
    kernel with this signature reads the pages in place instead (and never loads the tail).

    NOTE: the keys and values the mask hides are zeroed, not only masked. They are whatever bytes
    sit there (the padding block 0 and a last block's tail may hold another job's int8 codes,
    which read as floats can be NaN or inf), and a softmax weight of 0 times NaN is NaN.
    """
    batch, max_blocks = block_tables.shape
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    max_len = max_blocks * block_size
    flat_tables = block_tables.flatten()
    keys = torch.arange(max_len, device=query.device)[None, :]
    mask = keys < context_lens[:, None]
    if window is not None:
        mask &= keys >= context_lens[:, None] - window
    hidden = ~mask[:, :, None, None]
    key, value = (pages.index_select(0, flat_tables).view(batch, max_len, num_kv_heads, head_dim).to(query.dtype)
                  .masked_fill_(hidden, 0).transpose(1, 2) for pages in (key_cache, value_cache))
    out = attend(query.unsqueeze(2), key, value, scale, mask=mask[:, None, None, :], softcap=softcap)
    return out.squeeze(2)


def as_paged(x: torch.Tensor, page_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a reader of pages of ``page_dtype`` gets it back: the fp8 rounding the page write
    applies (``to_pages``), then ``x``'s dtype again. Where the pages are in ``x``'s dtype this is ``x``."""
    return to_pages(x, page_dtype).to(x.dtype)


def fresh_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scale: float, window: int | None = None, softcap: float | None = None,
                            padded_len: int | None = None) -> torch.Tensor:
    """Causal attention of a chunk that starts at position 0: its own K/V are all the keys, so
    they are used as they are instead of being gathered back from the pages (on fp8 pages the
    caller passes them as the pages hold them: :func:`as_paged`). With ``padded_len`` (the
    kernel plan chose cuDNN SDPA) a plain causal layer in fp16/bf16 runs
    :func:`padded_causal_attention` on cuDNN; any other layer runs as without it."""
    n = query.shape[0]
    if padded_len is not None and softcap is None and not cuts(window, n) and query.dtype in PADDED_DTYPES:
        return padded_causal_attention(query, key, value, scale, padded_len, SDPBackend.CUDNN_ATTENTION)
    mask = window_mask(torch.arange(n, device=query.device), n, window) if cuts(window, n) else None
    out = attend(query.transpose(0, 1).unsqueeze(0), key.transpose(0, 1).unsqueeze(0),
                 value.transpose(0, 1).unsqueeze(0), scale, mask=mask, causal=True, softcap=softcap)
    return out.squeeze(0).transpose(0, 1)


#: Query dtypes cuDNN SDPA computes (the padded call runs only on them).
PADDED_DTYPES = (torch.float16, torch.bfloat16)
#: Fresh chunks of at most this many rows stay on flash SDPA even where the plan chose cuDNN:
#: the planner times the long prompts (1,025 and 2,048 rows), not short ones, which a pad to 256
#: rows would mostly fill with padding; serving's prefill chunks (256 rows a step at most) then
#: never build a cuDNN plan.
CUDNN_MIN_ROWS = 256


def padded_lengths(max_len: int) -> tuple[int, ...]:
    """The lengths fresh chunks of up to ``max_len`` tokens pad to: multiples of 256 up to 2048,
    then eight per doubling (a pad adds at most an eighth of the length), the last ``max_len``.
    One cuDNN plan per length: a few dozen at most, all built at start-up."""
    lengths, length = [], 0
    while length < max_len:
        length = min(max_len, length + max(256, 1 << max(0, length.bit_length() - 4)))
        lengths.append(length)
    return tuple(lengths)


def padded_length(n: int, lengths: tuple[int, ...]) -> int | None:
    """The smallest of ``lengths`` (ascending) that holds ``n`` rows; None: none does."""
    i = bisect.bisect_left(lengths, n)
    return lengths[i] if i < len(lengths) else None


def padded_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                            length: int, backend: SDPBackend) -> torch.Tensor:
    """Causal SDPA of one fresh chunk (``query [n, heads, dim]``, ``key``/``value``
    ``[n, kv_heads, dim]``) with zero rows appended up to ``length``, on ``backend`` only.
    Exact for the ``n`` real rows, which come back: a query at position ``i`` sees keys ``<= i``
    only, never a padding key. The point: cuDNN builds an execution plan per (query, key) shape,
    and padded inputs of one length (and one layout) reuse one plan."""
    n = query.shape[0]
    # contiguous(): one layout per length whatever the caller's strides (a plan is per layout too).
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, length - n)).contiguous().transpose(0, 1).unsqueeze(0)
               for x in (query, key, value))
    # NOTE: sdpa_kernel sets torch's process-wide backend flags (cuDNN on, the others off) and
    # restores them on exit; the runner keeps cuDNN off outside this call.
    with sdpa_kernel([backend]):
        out = attend(q, k, v, scale, causal=True)
    return out.squeeze(0).transpose(0, 1)[:n]


def batched_fresh_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            fresh: FreshBatch, scale: float, window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """Causal attention of several fresh chunks of the step in one padded call. ``query``
    ``[T, heads, dim]`` and ``key``/``value`` ``[T, kv_heads, dim]`` are the whole step's rows;
    returns ``[S * L, heads, dim]``, the padded batch flattened (real rows at ``fresh.slots``)."""
    shape = (fresh.num_seqs, fresh.max_len)
    q, k, v = (x.index_select(0, fresh.gather).view(*shape, *x.shape[1:]).transpose(1, 2)
               for x in (query, key, value))
    mask = fresh.mask
    if cuts(window, fresh.max_len):
        # Only real query rows are windowed: a padded row keeps every real key (never an empty row).
        real = fresh.mask[:, 0, -1]  # [S, L]: position j is a real token of chunk s
        in_window = window_mask(torch.arange(fresh.max_len, device=query.device), fresh.max_len, window)
        mask = mask & (in_window | ~real[:, None, :, None])
    out = attend(q, k, v, scale, mask=mask, softcap=softcap)
    return out.transpose(1, 2).reshape(-1, *query.shape[1:])


def unified_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                      scale: float, config: object = None, *, window: int | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """Reference of :func:`alise.worker.kernels.triton_unified.unified_attention`: sequence ``s`` owns
    rows ``[query_start[s], query_start[s + 1])`` of ``query [T, heads, dim]`` and attends
    causally (within ``window``) to its first ``seq_lens[s]`` cached keys. Rows of no sequence
    come back as zeros. ``config`` (the kernel's launch configuration) means nothing here."""
    out = torch.zeros_like(query)
    starts = query_start.tolist()
    lens = seq_lens.tolist()
    block_size = key_cache.shape[1]
    for s, ctx in enumerate(lens):
        first, n = starts[s], starts[s + 1] - starts[s]
        if n == 0:
            continue
        table = block_tables[s, :-(-ctx // block_size)]
        rows = slice(first, first + n)
        if n == 1:
            out[rows] = decode_attention(query[rows], key_cache, value_cache, table[None], seq_lens[s:s + 1], scale,
                                         window=window, softcap=softcap)
            continue
        mask = window_mask(torch.arange(ctx - n, ctx, device=query.device), ctx, None)
        out[rows] = prefill_attention(query[rows], key_cache, value_cache, table, ctx, mask, scale,
                                      window=window, softcap=softcap)
    return out


@dataclass(frozen=True)
class AttentionBackend:
    """The pluggable pieces of paged attention, with the signatures of this module's
    :func:`write_kv`, :func:`decode_attention` and :func:`unified_attention`."""

    name: str
    write_kv: Callable[..., None]
    decode_attention: Callable[..., torch.Tensor]
    unified_attention: Callable[..., torch.Tensor] = unified_attention


TORCH_BACKEND = AttentionBackend("torch", write_kv, decode_attention)


def triton_backend() -> AttentionBackend:
    """The Triton kernels of ``alise.worker.kernels.triton_attention`` as a backend (CUDA, or the
    Triton interpreter in the CPU tests); triton is imported only when one is asked for."""
    from alise.worker.kernels import triton_attention, triton_unified

    return AttentionBackend("triton", triton_attention.write_kv, triton_attention.decode_attention,
                            triton_unified.unified_attention)


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    backend: AttentionBackend = TORCH_BACKEND, kv_written: bool = False, *,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One layer's attention for the whole flattened step.

    ``query [T, num_heads, head_dim]``, ``key``/``value [T, num_kv_heads, head_dim]`` (already
    position-encoded); writes K/V into the pages (unless ``kv_written``: a fused kernel did),
    returns ``[T, num_heads, head_dim]``. ``window`` and ``softcap``: see the module docstring.
    """
    if not kv_written:
        backend.write_kv(key_cache, value_cache, key, value, meta.slot_mapping)
    extra = dict(window=window, softcap=softcap)
    if is_fp8(key_cache.dtype) and (meta.fresh is not None or any(s.context_len == s.num_tokens
                                                                   for s in meta.prefills)):
        # Fresh chunks attend to their own K/V as the pages hold them, as the kernels do.
        key, value = as_paged(key, key_cache.dtype), as_paged(value, value_cache.dtype)
    if meta.is_all_decode:
        return backend.decode_attention(query, key_cache, value_cache, meta.decode_block_tables,
                                        meta.decode_context_lens, scale, **(meta.decode_options or {}), **extra)
    if meta.unified is not None:
        u = meta.unified
        return backend.unified_attention(query, key_cache, value_cache, u.block_tables, u.seq_lens, u.query_start,
                                         scale, u.config, **extra)
    out = torch.empty_like(query)
    if meta.fresh is not None:
        padded = batched_fresh_attention(query, key, value, meta.fresh, scale, **extra)
        out.index_copy_(0, meta.fresh.rows, padded.index_select(0, meta.fresh.slots))
    for span in meta.prefills:
        rows = slice(span.row_start, span.row_start + span.num_tokens)
        if span.context_len == span.num_tokens:
            out[rows] = fresh_prefill_attention(query[rows], key[rows], value[rows], scale, **extra,
                                                padded_len=span.padded_len)
        else:
            out[rows] = prefill_attention(query[rows], key_cache, value_cache, span.block_table,
                                          span.context_len, span.mask, scale, **extra)
    if meta.decode_rows is not None:
        decoded = backend.decode_attention(query.index_select(0, meta.decode_rows), key_cache, value_cache,
                                           meta.decode_block_tables, meta.decode_context_lens, scale, **extra)
        out.index_copy_(0, meta.decode_rows, decoded)
    return out
