"""The unified paged-attention kernel against the torch reference, under the Triton interpreter.

Each case is a step as the serving loop builds them: decode rows, fresh prompts and chunks that
start mid-sequence (``start_pos > 0``), over shuffled block tables, with padding sequences (no
rows) and padding rows (in no sequence) as a CUDA graph's buckets have them. The output is
poisoned with NaN first: every real row must be written and within the dtype's rounding of the
float32 reference (``alise.worker.model.attention.unified_attention``); padding rows must stay NaN.
A negative control (one key too few for one sequence) must fail the same bound.

Run: ``pip install -e '.[kernels]'`` then ``pytest tests/unit/test_unified_attention_kernel.py``
(a few seconds; skipped where Triton is missing or a GPU is present).
"""

from __future__ import annotations

import random

import pytest
import torch
from kernelkit import TOLERANCE, interpreted, relative_error

from kernelcases import make_step, reference

unified = interpreted("alise.worker.kernels.triton_unified")


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


# (name, rows, heads, kv_heads, head_dim, block_size, config index, window, softcap): windows
# shorter than the contexts (the loop starts mid-sequence, some rows see no key of the first
# tiles), one as long as a chunk, one of a single key; soft-caps small enough to bend the logits.
WINDOWED = [
    ("window-decodes+chunks", [(40, 1), (0, 23), (33, 18), (100, 1)], 4, 2, 32, 8, 0, 7, None),
    ("window-small-tiles", [(5, 70), (0, 1), (130, 1)], 2, 2, 32, 16, 3, 20, None),
    ("window-1", [(12, 9), (3, 1)], 4, 4, 16, 4, 1, 1, None),
    ("softcap", [(40, 1), (0, 23), (33, 18)], 4, 2, 32, 8, 2, None, 1.5),
    ("window+softcap-gqa8", [(9, 12), (1, 1), (0, 37)], 16, 2, 32, 16, 4, 10, 2.0),
]


# Padding rows of a tile may see no key inside a window: 0 / 0 there, never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case_spec", WINDOWED, ids=[c[0] for c in WINDOWED])
def test_window_and_softcap_match_reference(case_spec: tuple, dtype: torch.dtype) -> None:
    name, rows, heads, kv_heads, head_dim, block_size, config_index, window, softcap = case_spec
    rng = random.Random(f"{name}-{dtype}")
    torch.manual_seed(rng.randrange(1 << 30))
    case = make_step(rows, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                     dtype=dtype, rng=rng, pad_seqs=1, pad_rows=2)
    case["query"] *= 3  # larger logits: the cap bends them, and the window's cut shows
    out = torch.full_like(case["query"], float("nan"))
    unified.unified_attention(**case, config=unified.CANDIDATES[config_index], out=out, window=window,
                              softcap=softcap)
    real = int(case["query_start"][-1])
    assert not out[:real].isnan().any(), "a real row was not written"
    assert out[real:].isnan().all(), "a padding row was written"
    expect = reference(case, window=window, softcap=softcap)[:real]
    assert relative_error(out[:real], expect) < TOLERANCE[dtype]
    # Negative control: the plain causal reference is far from it.
    assert relative_error(out[:real], reference(case)[:real]) > 100 * TOLERANCE[torch.float32]


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
