"""The Triton kernels on fp8 pages (``float8_e4m3fn``), under the Triton interpreter on the CPU.

Each kernel reads or writes the same fp8 pages as the torch reference of
``alise.worker.model.attention``: the page write (plain and fused with rotary positions) stores the
same bytes; the decode and unified kernels attend over fp8 pages within the float32 tolerance of
the reference over the pages' exact values (the kernels convert each tile in registers, so the
only rounding left is the query dtype's). tests/gpu/test_gpu_fp8_kv.py checks them compiled.
"""

from __future__ import annotations

import random

import pytest
import torch
from kernelkit import TOLERANCE, interpreted, relative_error

from alise.worker.model import attention as ref_attention
from alise.worker.model.kv_cache import FP8_MAX, to_pages
from kernelcases import make_step, reference

triton_attention = interpreted("alise.worker.kernels.triton_attention")
triton_unified = interpreted("alise.worker.kernels.triton_unified")
triton_fused = interpreted("alise.worker.kernels.triton_fused")

FP8 = torch.float8_e4m3fn


def fp8_pages(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return to_pages(scale * torch.randn(shape), FP8)


def assert_same_fp8(got: torch.Tensor, expect: torch.Tensor) -> None:
    """Equal bytes, but for the interpreter's known rounding slips (Triton 3.6 emulates the fp8
    cast in numpy): a value that rounds up to a power of two (a carry into the exponent) comes out
    half of it, and subnormals (below 2**-6) may round otherwise. Compiled, the cast is the
    hardware's, and tests/gpu/test_gpu_fp8_kv.py asserts equal bytes."""
    differ = got.view(torch.uint8) != expect.view(torch.uint8)
    assert differ.float().mean() < 0.05
    e, g = expect.float()[differ], got.float()[differ]
    carry = (g == e / 2) & (e.abs().log2() == e.abs().log2().round())
    assert (carry | (e.abs() < 2 ** -6)).all()


def test_write_kv_stores_the_reference_bytes() -> None:
    torch.manual_seed(0)
    key, value = 3 * torch.randn(9, 2, 32), 3 * torch.randn(9, 2, 32)
    key[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, 1e-4])  # saturated, exact, subnormal
    slots = torch.tensor([5, -1, 0, 17, 3, 30, 8, 2, 11])
    pages = [torch.zeros(8, 4, 2, 32, dtype=FP8) for _ in range(4)]
    triton_attention.write_kv(pages[0], pages[1], key, value, slots)
    ref_attention.write_kv(pages[2], pages[3], key, value, slots)
    assert_same_fp8(pages[0], pages[2])
    assert_same_fp8(pages[1], pages[3])
    stored = pages[0].view(-1, 2, 32)[5, 0, :4].float()
    assert stored.tolist()[:3] == [FP8_MAX, -FP8_MAX, FP8_MAX]  # never NaN
    assert pages[1].view(-1, 2, 32)[5].float().abs().sum() > 0


def test_rope_write_kv_stores_the_reference_bytes() -> None:
    torch.manual_seed(1)
    t, heads, kv_heads, dim = 7, 4, 2, 16
    q, k, v = torch.randn(t, heads, dim), 2 * torch.randn(t, kv_heads, dim), 2 * torch.randn(t, kv_heads, dim)
    angle = torch.randn(t, dim // 2).repeat(1, 2)
    cos, sin = angle.cos(), angle.sin()
    slots = torch.tensor([3, 9, -1, 0, 14, 6, 1])
    pages = [torch.zeros(4, 4, kv_heads, dim, dtype=FP8) for _ in range(4)]
    triton_fused.rope_write_kv(q, k, v, cos, sin, pages[0], pages[1], slots)
    half = dim // 2
    rotated = k * cos[:, None] + torch.cat((-k[..., half:], k[..., :half]), -1) * sin[:, None]
    ref_attention.write_kv(pages[2], pages[3], rotated, v, slots)
    # The rotation's float32 rounding may differ in the last bit, which fp8 almost always absorbs.
    assert (pages[0].view(torch.uint8) != pages[2].view(torch.uint8)).float().mean() < 0.02
    assert_same_fp8(pages[1], pages[3])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("heads", "kv_heads", "splits", "window", "softcap"), [
    (4, 4, 1, None, None), (8, 2, 3, None, None), (4, 1, 4, 9, 2.0),
], ids=["mha", "gqa-split3", "mqa-split4-window-softcap"])
def test_decode_kernel_on_fp8_pages(dtype, heads, kv_heads, splits, window, softcap) -> None:
    rng = random.Random(f"{dtype}-{heads}-{splits}")
    torch.manual_seed(rng.randrange(1 << 30))
    block_size, dim, contexts = 8, 32, [70, 5, 33]
    width = -(-max(contexts) // block_size) + 1
    ids = list(range(sum(-(-c // block_size) for c in contexts) + 2))
    rng.shuffle(ids)
    tables = torch.zeros(len(contexts), width, dtype=torch.int64)
    for b, c in enumerate(contexts):
        n = -(-c // block_size)
        tables[b, :n], ids = torch.tensor(ids[:n]), ids[n:]
    num_blocks = int(tables.max()) + 1
    key_cache, value_cache = fp8_pages(num_blocks, block_size, kv_heads, dim), fp8_pages(num_blocks, block_size,
                                                                                          kv_heads, dim)
    query = torch.randn(len(contexts), heads, dim).to(dtype)
    lens = torch.tensor(contexts)
    extra = dict(window=window, softcap=softcap)
    out = triton_attention.decode_attention(query, key_cache, value_cache, tables, lens, dim ** -0.5,
                                            num_splits=splits, fused_merge=splits > 1, **extra)
    # The reference reads the same pages (converted to the query's dtype), and over float32 copies.
    same = ref_attention.decode_attention(query, key_cache, value_cache, tables, lens, dim ** -0.5, **extra)
    exact = ref_attention.decode_attention(query.float(), key_cache.float(), value_cache.float(), tables, lens,
                                           dim ** -0.5, **extra)
    assert relative_error(out, exact) < TOLERANCE[dtype]
    assert relative_error(same, exact) < TOLERANCE[dtype]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window"])
def test_unified_kernel_on_fp8_pages(dtype: torch.dtype, window: int | None) -> None:
    rng = random.Random(f"{dtype}-{window}")
    torch.manual_seed(rng.randrange(1 << 30))
    case = make_step([(20, 1), (0, 19), (11, 9), (40, 1)], num_heads=4, num_kv_heads=2, head_dim=32,
                     block_size=8, dtype=dtype, rng=rng, pad_seqs=1, pad_rows=2)
    case["key_cache"], case["value_cache"] = (to_pages(case[k].float(), FP8) for k in ("key_cache", "value_cache"))
    out = torch.zeros_like(case["query"])
    triton_unified.unified_attention(**case, out=out, window=window)
    expect = reference(case, window=window)  # float32 copies of the fp8 pages
    same = ref_attention.unified_attention(case["query"], case["key_cache"], case["value_cache"],
                                           case["block_tables"], case["seq_lens"], case["query_start"],
                                           case["scale"], window=window)
    rows = int(case["query_start"][-1])
    assert relative_error(out[:rows], expect[:rows]) < TOLERANCE[dtype]
    assert relative_error(same[:rows], expect[:rows]) < TOLERANCE[dtype]
