"""The unified paged-attention kernel against the torch reference, under the Triton interpreter.

Each case is a step as the serving loop builds them: decode rows, fresh prompts and chunks that
start mid-sequence (``start_pos > 0``), over shuffled block tables, with padding sequences (no
rows) and padding rows (in no sequence) as a CUDA graph's buckets have them. The output is
poisoned with NaN first: every real row must be written and within the dtype's rounding of the
float32 reference (``alise.worker.attention.unified_attention``); padding rows must stay NaN.
A negative control (one key too few for one sequence) must fail the same bound.

Run: ``pip install -e '.[kernels]'`` then ``pytest tests/unit/test_unified_attention_kernel.py``
(a few seconds; skipped where Triton is missing or a GPU is present).
"""

from __future__ import annotations

import random

import pytest
import torch
from kernelkit import TOLERANCE, interpreted, relative_error

from alise.worker import attention as ref_attention

unified = interpreted("alise.worker.triton_unified")


def make_step(rows: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, rng: random.Random, pad_seqs: int = 0, pad_rows: int = 0) -> dict:
    """``rows``: (start_pos, num_tokens) per sequence. Block tables are shuffled and wider than needed."""
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
    return dict(query=torch.randn(num_tokens, num_heads, head_dim).to(dtype),
                key_cache=torch.randn(shape).to(dtype), value_cache=torch.randn(shape).to(dtype),
                block_tables=tables, seq_lens=torch.tensor(contexts + [1] * pad_seqs),
                query_start=torch.tensor(starts), scale=head_dim ** -0.5)


def reference(case: dict, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    return ref_attention.unified_attention(
        case["query"].float(), case["key_cache"].float(), case["value_cache"].float(), case["block_tables"],
        case["seq_lens"] if seq_lens is None else seq_lens, case["query_start"], case["scale"])


# (name, rows, heads, kv_heads, head_dim, block_size, config index)
CASES = [
    ("decodes+fresh+chunk", [(40, 1), (0, 23), (7, 1), (33, 18), (100, 1)], 4, 4, 64, 16, 0),
    ("gqa4-chunks", [(0, 37), (16, 1), (50, 20)], 8, 2, 64, 8, 2),
    ("mqa-hd80", [(3, 1), (0, 5), (61, 9)], 4, 1, 80, 16, 1),
    ("long-chunk-small-tiles", [(5, 70), (0, 1), (130, 1)], 2, 2, 32, 16, 3),
    ("one-key", [(0, 1), (0, 2)], 2, 2, 16, 4, 5),
    ("bm128-gqa8", [(9, 12), (1, 1), (0, 17)], 16, 2, 32, 16, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case_spec", CASES, ids=[c[0] for c in CASES])
def test_unified_kernel_matches_reference(case_spec: tuple, dtype: torch.dtype) -> None:
    name, rows, heads, kv_heads, head_dim, block_size, config_index = case_spec
    rng = random.Random(f"{name}-{dtype}")
    torch.manual_seed(rng.randrange(1 << 30))
    case = make_step(rows, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                     dtype=dtype, rng=rng, pad_seqs=2, pad_rows=3)
    out = torch.full_like(case["query"], float("nan"))
    unified.unified_attention(**case, config=unified.CANDIDATES[config_index], out=out)
    real = int(case["query_start"][-1])
    assert not out[:real].isnan().any(), "a real row was not written"
    assert out[real:].isnan().all(), "a padding row was written"
    err = relative_error(out[:real], reference(case)[:real])
    assert err < TOLERANCE[dtype], f"{name} {dtype}: rel err {err:.2e}"


def test_one_key_too_few_is_caught() -> None:
    """Negative control: the same bound must fail when one sequence's context is one key short."""
    rng = random.Random(3)
    case = make_step([(20, 1), (0, 12), (30, 6)], num_heads=2, num_kv_heads=2, head_dim=32, block_size=8,
                     dtype=torch.float32, rng=rng)
    ref = reference(case)
    short = case["seq_lens"].clone()
    short[2] -= 1
    out = unified.unified_attention(**{**case, "seq_lens": short})
    rows = slice(int(case["query_start"][2]), int(case["query_start"][3]))
    assert relative_error(out[rows], ref[rows]) > 100 * TOLERANCE[torch.float32]


def test_bad_shapes_are_refused() -> None:
    case = make_step([(0, 3)], num_heads=4, num_kv_heads=4, head_dim=16, block_size=4, dtype=torch.float32,
                     rng=random.Random(0))
    with pytest.raises(ValueError, match="query_start needs 2 entries"):
        unified.unified_attention(**{**case, "query_start": torch.tensor([0, 3, 3])})
    with pytest.raises(ValueError, match="cannot hold the 32 query heads"):
        unified.unified_attention(**{**case, "query": torch.randn(3, 128, 16)})
