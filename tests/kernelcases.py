"""Random steps for the unified attention kernel's tests, on any device (tests/unit under the
Triton interpreter, tests/gpu compiled)."""

from __future__ import annotations

import random

import torch

from alise.worker.model import attention as ref_attention


def make_step(rows: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, rng: random.Random, pad_seqs: int = 0, pad_rows: int = 0,
              device: str = "cpu") -> dict:
    """Arguments of ``unified_attention`` for sequences of ``rows`` ((start_pos, num_tokens) each),
    then ``pad_seqs`` sequences of no rows and ``pad_rows`` rows of no sequence. Block tables are
    shuffled and wider than needed."""
    contexts = [s + n for s, n in rows]
    width = max(-(-c // block_size) for c in contexts) + 2
    num_blocks = sum(-(-c // block_size) for c in contexts) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    num_seqs = len(rows) + pad_seqs
    tables = torch.zeros(num_seqs, width, dtype=torch.int64)
    for i, c in enumerate(contexts):
        k = -(-c // block_size)
        tables[i, :k] = torch.tensor(free[:k])
        free = free[k:]
    starts = [0]
    for _, n in rows:
        starts.append(starts[-1] + n)
    starts += [starts[-1]] * pad_seqs
    num_tokens = starts[-1] + pad_rows
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return dict(query=torch.randn(num_tokens, num_heads, head_dim, device=device).to(dtype),
                key_cache=torch.randn(shape, device=device).to(dtype),
                value_cache=torch.randn(shape, device=device).to(dtype),
                block_tables=tables.to(device), seq_lens=torch.tensor(contexts + [1] * pad_seqs, device=device),
                query_start=torch.tensor(starts, device=device), scale=head_dim ** -0.5)


def reference(case: dict, seq_lens: torch.Tensor | None = None, *, window: int | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """The torch reference on float32 upcasts of the case."""
    return ref_attention.unified_attention(
        case["query"].float(), case["key_cache"].float(), case["value_cache"].float(), case["block_tables"],
        case["seq_lens"] if seq_lens is None else seq_lens, case["query_start"], case["scale"],
        window=window, softcap=softcap)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()
