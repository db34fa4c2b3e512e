"""The Triton paged-decode kernel and page write against the torch reference, on random inputs.

Every case draws fresh inputs (shapes, contexts, shuffled block tables, dtype), poisons the output
with NaN first, and checks every element was written and ``|out - ref| / |ref|`` (Frobenius) is
within the dtype's rounding: the reference is the torch implementation on float32 upcasts. A
negative control feeds contexts one short and must fail the same bound. CUDA only.
"""

from __future__ import annotations

import random

import pytest
import torch

from alise.worker.model import attention as ref_attention

# Before any kernel module is imported: on a machine without CUDA the interpreter tests of
# tests/unit import them (compiled for the interpreter) in this same process.
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

triton_attention = pytest.importorskip("alise.worker.kernels.triton_attention")
pytestmark = pytest.mark.skipif(not triton_attention.is_available(), reason="needs CUDA and Triton")

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (batch, num_heads, num_kv_heads, head_dim, block_size, max_context, forced num_splits or None)
SHAPES = [
    (1, 40, 40, 128, 16, 2048, None),   # OPT-13B, batch 1: split-K
    (64, 40, 40, 128, 16, 600, None),   # OPT-13B, batch 64: one range per sequence
    (7, 12, 12, 64, 16, 300, None),     # OPT-125m
    (5, 32, 8, 128, 16, 1500, None),    # Llama GQA 4
    (3, 8, 1, 64, 8, 200, 3),           # multi-query, small pages, odd split count
    (33, 16, 4, 80, 32, 900, None),     # head_dim not a power of two
    (2, 4, 2, 256, 16, 700, 16),        # wide heads, many splits (some empty)
    (9, 32, 32, 128, 16, 70, 1),        # no split, short contexts
    (1, 8, 8, 64, 16, 1, None),         # one key
]


def make_case(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, max_context: int,
              dtype: torch.dtype, rng: random.Random) -> dict:
    contexts = [rng.randint(1, max_context) for _ in range(batch)]
    contexts[0] = max_context  # the longest context always appears
    width = -(-max_context // block_size) + 3  # wider than needed, like a graph's static table
    num_blocks = sum(-(-c // block_size) for c in contexts) + 4
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = torch.zeros(batch, width, dtype=torch.int64)
    for b, c in enumerate(contexts):
        n = -(-c // block_size)
        tables[b, :n] = torch.tensor(free[:n])
        free = free[n:]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return dict(query=torch.randn(batch, num_heads, head_dim, device="cuda").to(dtype),
                key_cache=torch.randn(shape, device="cuda").to(dtype),
                value_cache=torch.randn(shape, device="cuda").to(dtype),
                block_tables=tables.cuda(), context_lens=torch.tensor(contexts, device="cuda"),
                scale=head_dim ** -0.5)


def reference(case: dict, context_lens: torch.Tensor | None = None) -> torch.Tensor:
    return ref_attention.decode_attention(
        case["query"].float(), case["key_cache"].float(), case["value_cache"].float(), case["block_tables"],
        case["context_lens"] if context_lens is None else context_lens, case["scale"])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"b{s[0]}-h{s[1]}-kv{s[2]}-d{s[3]}-bs{s[4]}-ctx{s[5]}" for s in SHAPES])
def test_decode_kernel_matches_reference(shape: tuple, dtype: torch.dtype) -> None:
    batch, heads, kv_heads, head_dim, block_size, max_context, splits = shape
    rng = random.Random(repr(shape) + str(dtype))
    torch.manual_seed(rng.randrange(1 << 30))
    for _ in range(3):  # fresh inputs each round
        case = make_case(batch, heads, kv_heads, head_dim, block_size, max_context, dtype, rng)
        out = torch.full_like(case["query"], float("nan"))
        triton_attention.decode_attention(**case, num_splits=splits, out=out)
        assert not out.isnan().any(), "some output elements were never written"
        err = relative_error(out, reference(case))
        print(f"kernel {dtype} b={batch} h={heads}/{kv_heads} d={head_dim} bs={block_size} "
              f"max_ctx={max_context} splits={splits}: rel err {err:.2e}")
        assert err < TOLERANCE[dtype]


def test_a_wrong_context_length_is_caught() -> None:
    """Negative control: the same bound must fail when the kernel sees one key too few."""
    rng = random.Random(7)
    case = make_case(4, 8, 8, 64, 16, 40, torch.float16, rng)
    case["context_lens"] = torch.tensor([40, 3, 17, 33], device="cuda")
    ref = reference(case)
    case["context_lens"] = case["context_lens"] - 1
    out = triton_attention.decode_attention(**case)
    assert relative_error(out, ref) > 10 * TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_page_write_matches_reference_and_skips_negative_slots(dtype: torch.dtype) -> None:
    num_blocks, block_size, kv_heads, head_dim, tokens = 20, 16, 8, 128, 50
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[::7] = -1
    qkv = torch.randn(tokens, 3 * kv_heads, head_dim, device="cuda").to(dtype)  # strided views, as in the runner
    key, value = qkv[:, kv_heads:2 * kv_heads], qkv[:, 2 * kv_heads:]
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), 7.0, device="cuda", dtype=dtype)
              for _ in range(4)]
    triton_attention.write_kv(caches[0], caches[1], key, value, slots)
    ref_attention.write_kv(caches[2], caches[3], key, value, slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert (caches[0] == 7.0).all(dim=(2, 3)).sum() == num_blocks * block_size - (slots >= 0).sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("shape", "splits"), [((1, 40, 40, 128, 16, 2048), 32), ((2, 32, 8, 128, 16, 1500), 16),
                                               ((5, 8, 1, 64, 8, 200), 3)], ids=["opt13b-b1", "gqa-b2", "mqa-b5"])
def test_fused_merge_matches_the_merge_kernel(shape: tuple, splits: int, dtype: torch.dtype) -> None:
    """The split-K merge done by the last split inside the launch: on fresh data ten times (an
    ordering bug shows as an intermittent error), counters back at zero after every call."""
    rng = random.Random(repr(shape) + str(dtype))
    torch.manual_seed(rng.randrange(1 << 30))
    batch, heads, kv_heads, head_dim, block_size, max_context = shape
    for _ in range(10):
        case = make_case(batch, heads, kv_heads, head_dim, block_size, max_context, dtype, rng)
        out = torch.full_like(case["query"], float("nan"))
        triton_attention.decode_attention(**case, num_splits=splits, out=out, fused_merge=True)
        assert not out.isnan().any()
        assert relative_error(out, reference(case)) < TOLERANCE[dtype]
        assert not triton_attention._COUNTERS[case["query"].device].any()



# (batch, heads, kv_heads, head_dim, block_size, max_context, splits, window, softcap): Mistral's and
# Gemma's shapes with windows shorter than the contexts (split-K over the window only; pages
# before it never read) and Gemma 2's soft-cap.
WINDOWED = [
    (1, 32, 8, 128, 16, 6000, None, 4096, None),  # Mistral 7B, batch 1: split-K inside the window
    (48, 32, 8, 128, 16, 1500, None, 512, None),
    (4, 16, 8, 256, 16, 3000, 8, 1024, 5.0),      # Gemma 2 9B's local layers
    (3, 16, 8, 256, 16, 900, None, None, 5.0),    # Gemma 2 9B's global layers
    (5, 8, 2, 64, 8, 300, 4, 7, 3.0),             # a tiny window: most splits empty
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", WINDOWED, ids=[f"b{s[0]}-h{s[1]}-d{s[3]}-ctx{s[5]}-w{s[7]}-cap{s[8]}"
                                                 for s in WINDOWED])
def test_window_and_softcap_match_reference(shape: tuple, dtype: torch.dtype) -> None:
    batch, heads, kv_heads, head_dim, block_size, max_context, splits, window, softcap = shape
    rng = random.Random(repr(shape) + str(dtype))
    torch.manual_seed(rng.randrange(1 << 30))
    for fused_merge in (False, True):
        case = make_case(batch, heads, kv_heads, head_dim, block_size, max_context, dtype, rng)
        case["query"] *= 4  # larger logits: the cap bends them
        out = torch.full_like(case["query"], float("nan"))
        triton_attention.decode_attention(**case, num_splits=splits, out=out, fused_merge=fused_merge, window=window,
                                          softcap=softcap)
        expect = ref_attention.decode_attention(case["query"].float(), case["key_cache"].float(),
                                                case["value_cache"].float(), case["block_tables"],
                                                case["context_lens"], case["scale"], window=window, softcap=softcap)
        assert not out.isnan().any()
        err = relative_error(out, expect)
        print(f"decode window={window} softcap={softcap} {dtype} b={batch} d={head_dim}: rel err {err:.2e}")
        assert err < TOLERANCE[dtype]
        assert relative_error(out, reference(case)) > 5 * TOLERANCE[dtype]  # plain attention is far off
