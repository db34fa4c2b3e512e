"""The Triton paged-decode kernel (split-K, merged by a second kernel or in the same launch)
against the torch reference, under the Triton interpreter, outputs poisoned with NaN first.

The interpreter runs programs one after another, so it checks the fused merge's arithmetic and
bookkeeping (the last split merges, counters return to zero), not its memory ordering: that is
tests/gpu's (repeated runs on fresh data) and the start-up check's. fp32 and fp16 (the
interpreter's bf16 ``tl.dot`` is wrong; tests/gpu covers bf16).

Run: ``pip install -e '.[kernels]'`` then ``pytest tests/unit/test_decode_kernel.py`` (seconds;
skipped where Triton is missing or a GPU is present).
"""

from __future__ import annotations

import random

import pytest
import torch
from kernelkit import TOLERANCE, interpreted, relative_error

from alise.worker.model import attention as ref_attention

triton_attention = interpreted("alise.worker.kernels.triton_attention")


def make_case(batch: int, heads: int, kv_heads: int, head_dim: int, block_size: int, max_context: int,
              dtype: torch.dtype, rng: random.Random) -> dict:
    contexts = [rng.randint(1, max_context) for _ in range(batch)]
    contexts[0] = max_context
    width = -(-max_context // block_size) + 2
    num_blocks = sum(-(-c // block_size) for c in contexts) + 2
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = torch.zeros(batch, width, dtype=torch.int64)
    for b, c in enumerate(contexts):
        n = -(-c // block_size)
        tables[b, :n] = torch.tensor(free[:n])
        free = free[n:]
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return dict(query=torch.randn(batch, heads, head_dim).to(dtype), key_cache=torch.randn(shape).to(dtype),
                value_cache=torch.randn(shape).to(dtype), block_tables=tables,
                context_lens=torch.tensor(contexts), scale=head_dim ** -0.5)


# Padded query-head rows and empty splits hold -inf maxima; their NaNs are never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("shape", "splits", "fused"), [
    ((3, 4, 4, 32, 8, 90), 1, False), ((3, 4, 4, 32, 8, 90), 3, False), ((3, 4, 4, 32, 8, 90), 3, True),
    ((2, 8, 2, 16, 16, 200), 4, True), ((4, 4, 1, 16, 4, 7), 8, True),  # some splits empty
], ids=["nosplit", "split3-merge-kernel", "split3-fused", "gqa-split4-fused", "mqa-split8-fused-empty"])
def test_decode_kernel_matches_reference(dtype: torch.dtype, shape: tuple, splits: int, fused: bool) -> None:
    rng = random.Random(f"{shape}-{splits}-{fused}-{dtype}")
    torch.manual_seed(rng.randrange(1 << 30))
    for _ in range(2):  # twice: the counters the first call leaves must serve the second
        case = make_case(*shape, dtype=dtype, rng=rng)
        out = torch.full_like(case["query"], float("nan"))
        triton_attention.decode_attention(**case, num_splits=splits, out=out, fused_merge=fused)
        assert not out.isnan().any()
        expect = ref_attention.decode_attention(case["query"].float(), case["key_cache"].float(),
                                                case["value_cache"].float(), case["block_tables"],
                                                case["context_lens"], case["scale"])
        assert relative_error(out, expect) < TOLERANCE[dtype]
    if fused:
        assert not triton_attention._COUNTERS[torch.device("cpu")].any()


# Windows shorter than most contexts (with split-K the ranges divide the window, and some splits
# are empty), one longer than every context; soft-caps that bend the logits.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("shape", "splits", "window", "softcap"), [
    ((3, 4, 4, 32, 8, 90), 1, 17, None), ((3, 8, 2, 16, 16, 200), 4, 40, None), ((4, 4, 1, 16, 4, 30), 8, 5, None),
    ((3, 4, 2, 32, 8, 90), 3, None, 1.5), ((3, 4, 2, 32, 8, 90), 3, 25, 2.0), ((2, 4, 4, 16, 4, 12), 2, 64, None),
], ids=["window", "gqa-split4-window", "mqa-split8-window5", "softcap", "window+softcap", "window-beyond-context"])
def test_window_and_softcap_match_reference(dtype: torch.dtype, shape: tuple, splits: int, window: int | None,
                                            softcap: float | None) -> None:
    rng = random.Random(f"{shape}-{splits}-{window}-{softcap}-{dtype}")
    torch.manual_seed(rng.randrange(1 << 30))
    case = make_case(*shape, dtype=dtype, rng=rng)
    case["query"] *= 3  # larger logits: the cap bends them, and the window's cut shows
    out = torch.full_like(case["query"], float("nan"))
    triton_attention.decode_attention(**case, num_splits=splits, out=out, fused_merge=splits > 1, window=window,
                                      softcap=softcap)
    floats = dict(query=case["query"].float(), key_cache=case["key_cache"].float(),
                  value_cache=case["value_cache"].float())
    expect = ref_attention.decode_attention(**{**case, **floats}, window=window, softcap=softcap)
    assert relative_error(out, expect) < TOLERANCE[dtype]
    plain = ref_attention.decode_attention(**{**case, **floats})
    cut = window is not None and window < max(case["context_lens"].tolist())
    if cut or softcap is not None:  # negative control: plain attention is far from it
        assert relative_error(out, plain) > 100 * TOLERANCE[torch.float32]
