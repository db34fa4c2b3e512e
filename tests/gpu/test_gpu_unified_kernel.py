"""The unified paged-attention kernel, compiled, against the torch reference. CUDA only.

Steps as chunked prefill builds them on a serving GPU (up to ~256 decode rows beside chunks of
up to ~512 tokens at any start position) at the model shapes served (OPT-13B heads 40/40/128,
Llama GQA, MQA, head_dim 80), fp16 and bf16, every launch configuration the runner may pick on
the first two cases (the default one on the others: each configuration is a compile),
fresh random inputs for each case, output poisoned with NaN: every real row written, padding rows
untouched, ``||out - ref|| / ||ref||`` within the dtype's rounding. A negative control (one
context one key short) must fail the same bound. One case runs inside a CUDA graph replayed over
two different splits of the same bucket, as the mixed-step graphs use it.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernelcases import make_step, reference, relative_error

# Before any kernel module is imported: on a machine without CUDA the interpreter tests of
# tests/unit import them (compiled for the interpreter) in this same process.
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

triton_attention = pytest.importorskip("alise.worker.kernels.triton_attention")
pytestmark = pytest.mark.skipif(not triton_attention.is_available(), reason="needs CUDA and Triton")
from alise.worker.kernels import triton_unified  # noqa: E402

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (name, rows as (start_pos, tokens), heads, kv_heads, head_dim, block_size)
CASES = [
    ("opt13b-256-decodes+chunk512", [(int(c), 1) for c in torch.randint(1, 1500, (256,), generator=torch.Generator()
                                                                          .manual_seed(0))] + [(700, 256)],
     40, 40, 128, 16),
    ("opt13b-8-decodes+fresh512", [(512, 1)] * 8 + [(0, 512)], 40, 40, 128, 16),
    ("opt13b-chunks-at-starts", [(0, 64), (300, 128), (1, 1), (1000, 200), (17, 1)], 40, 40, 128, 16),
    ("llama-gqa4", [(90, 1)] * 30 + [(0, 333), (200, 100)], 32, 8, 128, 16),
    ("mqa-bs8", [(5, 1), (0, 40), (77, 33)], 8, 1, 64, 8),
    ("hd80-gqa4-bs32", [(900, 1)] * 9 + [(64, 150)], 16, 4, 80, 32),
    ("one-key", [(0, 1), (0, 1), (0, 3)], 8, 8, 64, 16),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case_spec", CASES, ids=[c[0] for c in CASES])
def test_unified_kernel_matches_reference(case_spec: tuple, dtype: torch.dtype) -> None:
    name, rows, heads, kv_heads, head_dim, block_size = case_spec
    rng = random.Random(f"{name}-{dtype}")
    torch.manual_seed(rng.randrange(1 << 30))
    group = heads // kv_heads
    configs = triton_unified.CANDIDATES if case_spec in CASES[:2] else [
        next(c for c in triton_unified.CANDIDATES if c.block_m >= group)]
    for config in configs:
        if config.block_m < group:
            continue
        case = make_step(rows, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                         dtype=dtype, rng=rng, pad_seqs=3, pad_rows=5, device="cuda")
        out = torch.full_like(case["query"], float("nan"))
        triton_unified.unified_attention(**case, config=config, out=out)
        real = int(case["query_start"][-1])
        assert not out[:real].isnan().any(), f"{config}: a real row was not written"
        assert out[real:].isnan().all(), f"{config}: a padding row was written"
        err = relative_error(out[:real], reference(case)[:real])
        print(f"unified {name} {dtype} {config}: rel err {err:.2e}")
        assert err < TOLERANCE[dtype], f"{config}: rel err {err:.2e}"


def test_one_key_short_is_caught() -> None:
    rng = random.Random(1)
    case = make_step([(40, 1), (0, 64), (100, 30)], num_heads=8, num_kv_heads=8, head_dim=64, block_size=16,
                     dtype=torch.float16, rng=rng, device="cuda")
    expect = reference(case)
    short = case["seq_lens"].clone()
    short[2] -= 1
    out = triton_unified.unified_attention(**{**case, "seq_lens": short})
    rows = slice(int(case["query_start"][2]), int(case["query_start"][3]))
    assert relative_error(out[rows], expect[rows]) > 10 * TOLERANCE[torch.float16]


def test_one_graph_serves_any_split_of_its_bucket() -> None:
    """Captured once for (T=64 rows, S=8 sequences); replayed over two different steps."""
    rng = random.Random(2)
    splits = [[(30, 1)] * 5 + [(0, 40), (12, 10)], [(0, 1), (200, 60), (5, 1)]]
    cases = [make_step(r, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, rng=rng,
                       device="cuda") for r in splits]
    num_blocks = max(c["key_cache"].shape[0] for c in cases)
    width = max(c["block_tables"].shape[1] for c in cases)
    static = dict(query=torch.zeros(64, 8, 64, device="cuda", dtype=torch.float16),
                  key_cache=torch.zeros(num_blocks, 16, 2, 64, device="cuda", dtype=torch.float16),
                  value_cache=torch.zeros(num_blocks, 16, 2, 64, device="cuda", dtype=torch.float16),
                  block_tables=torch.zeros(8, width, dtype=torch.int64, device="cuda"),
                  seq_lens=torch.ones(8, dtype=torch.int64, device="cuda"),
                  query_start=torch.zeros(9, dtype=torch.int64, device="cuda"), scale=64 ** -0.5)

    def load(case: dict) -> None:
        n_seqs, n_rows = case["seq_lens"].shape[0], case["query"].shape[0]
        static["query"][:n_rows] = case["query"]
        static["key_cache"][:case["key_cache"].shape[0]] = case["key_cache"]
        static["value_cache"][:case["value_cache"].shape[0]] = case["value_cache"]
        static["block_tables"].zero_()
        static["block_tables"][:n_seqs, :case["block_tables"].shape[1]] = case["block_tables"]
        static["seq_lens"].fill_(1)
        static["seq_lens"][:n_seqs] = case["seq_lens"]
        static["query_start"].fill_(n_rows)
        static["query_start"][:n_seqs + 1] = case["query_start"]

    load(cases[0])
    triton_unified.unified_attention(**static)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_unified.unified_attention(**static)
    for case in cases:
        load(case)
        out.fill_(float("nan"))
        graph.replay()
        n = case["query"].shape[0]
        assert not out[:n].isnan().any()
        assert relative_error(out[:n], reference(case)) < TOLERANCE[torch.float16]


# (name, rows, heads, kv_heads, head_dim, block_size, window, softcap): chunked prefill beside
# decodes on windowed layers (Mistral 4096, Gemma local 1024, a window shorter than a tile) and
# Gemma 2's soft-capped global layers, every launch configuration.
WINDOWED = [
    ("mistral-w4096", [(int(c), 1) for c in torch.randint(1, 6000, (64,), generator=torch.Generator()
                                                           .manual_seed(1))] + [(4500, 256), (0, 300)],
     32, 8, 128, 16, 4096, None),
    ("gemma2-local", [(1500, 1)] * 16 + [(1200, 200), (0, 64)], 16, 8, 256, 16, 1024, 5.0),
    ("gemma2-global", [(700, 1)] * 16 + [(300, 200)], 16, 8, 256, 16, None, 5.0),
    ("window-13", [(40, 1), (0, 100), (90, 33)], 8, 2, 64, 16, 13, None),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case_spec", WINDOWED, ids=[c[0] for c in WINDOWED])
def test_window_and_softcap_match_reference(case_spec: tuple, dtype: torch.dtype) -> None:
    name, rows, heads, kv_heads, head_dim, block_size, window, softcap = case_spec
    rng = random.Random(f"{name}-{dtype}")
    torch.manual_seed(rng.randrange(1 << 30))
    group = heads // kv_heads
    for config in (c for c in triton_unified.CANDIDATES if c.block_m >= group):
        case = make_step(rows, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                         dtype=dtype, rng=rng, pad_seqs=2, pad_rows=3, device="cuda")
        case["query"] *= 4  # larger logits: the cap bends them
        out = torch.full_like(case["query"], float("nan"))
        triton_unified.unified_attention(**case, config=config, out=out, window=window, softcap=softcap)
        real = int(case["query_start"][-1])
        assert not out[:real].isnan().any(), f"{config}: a real row was not written"
        assert out[real:].isnan().all(), f"{config}: a padding row was written"
        err = relative_error(out[:real], reference(case, window=window, softcap=softcap)[:real])
        print(f"unified {name} {dtype} {config}: rel err {err:.2e}")
        assert err < TOLERANCE[dtype], f"{config}: rel err {err:.2e}"
        assert relative_error(out[:real], reference(case)[:real]) > 5 * TOLERANCE[dtype]  # plain is far off
