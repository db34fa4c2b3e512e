"""Served families with fp8 KV pages on the GPU: the fast path against the torch path, and fp8
against fp16 pages.

Per family of tests/gpu/test_gpu_families.py (hidden 1024, 4 layers, windows, soft-caps, GQA),
fp16 weights, the schedule of test_gpu_engine_vs_transformers (prompts prefilled together, one in
two chunks beside decodes, a late joiner, 64 teacher-forced decodes): four runners, each pair
compared by ``||a - b|| / ||b||`` over every logit the schedule returns.

- ``fast`` (:func:`page_plan`: the fused add + norm, rotary + page write and gated activation,
  the unified kernel for every step with a prompt, split-K decode; decode and mixed steps
  replayed from CUDA graphs, routed experts eagerly) against ``torch`` (the torch reference
  backend, eager), on fp16 pages and on fp8 pages. Both attend to every key and value as the
  pages hold it, a fresh prompt's own included, and on the CPU (float32, kernels interpreted)
  they agree to 4e-7 (tests/unit/test_attention_pages.py). The fused norm, rotary and
  activation round where torch rounds (the rotary bit for bit: test_gpu_fp8_kv.py), so in fp16
  the paths part only where the attention kernels sum and round in another order than torch's
  attention. fp8 pages amplify that: a value off by ``d`` (relative) lands on the other e4m3
  code with probability about ``d / s`` (``s`` e4m3's relative spacing, 2**-4 to 2**-3), an
  error of ``s``, so an RMS of ``sqrt(d * s)``, and the next layer's K/V inherit it. So on fp8
  pages the paths are bounded by half of what fp8 costs, not by fp16's rounding; a page read
  wrongly (block, layer, scale, conversion) costs more than fp8 itself. Routed experts amplify
  any difference again: a token whose router sits near a tie may take another expert, an O(1)
  change of its output (mixtral's fp8 cost is three times a dense family's).
- ``fast`` fp8 against ``fast`` fp16: what fp8 pages cost. With these random weights that is
  what rounding K/V to 3 mantissa bits costs, whatever the scale: ``bench/fp8_scales.py`` at these
  shapes on the CPU measures the same figures for e4m3 and for a 3-bit mantissa of unbounded
  range (docs/fp8_kv.md). CUDA only.

On a fresh machine (no Triton cache) a family's time goes mostly to compiling its kernels, one
per configuration, dtype and page dtype: the plan keeps one configuration per kernel.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_gpu_engine_vs_transformers import BLOCK_SIZE, run_schedule, schedule_inputs
from test_gpu_families import _COMMON, CASES

from alise.worker.model.cuda_graphs import decode_buckets, token_buckets
from alise.worker.model.families import describe
from alise.worker.model.kernel_plan import KernelPlan
from alise.worker.model.loader import LoadedModel
from alise.worker.model.runner import ModelRunner
from tinymodels import tiny_config, tiny_model

triton_attention = pytest.importorskip("alise.worker.kernels.triton_attention")
pytestmark = pytest.mark.skipif(not triton_attention.is_available(), reason="needs CUDA and Triton")

MAX_NUM_SEQS = 8


def build_fp16(name: str) -> LoadedModel:
    """test_gpu_families's model of ``name`` in fp16 on the GPU (no float32 copy: nothing here
    compares with transformers)."""
    family, overrides = CASES[name]
    model = tiny_model(tiny_config(family, **(_COMMON | overrides))).to(device="cuda", dtype=torch.float16)
    return LoadedModel(model=model, tokenizer=None, config=model.config, family=describe(model.config).family,
                       name=name, random_weights=True, max_model_len=model.config.max_position_embeddings,
                       eos_token_id=None, device=torch.device("cuda"), dtype=torch.float16)


def page_plan(runner: ModelRunner) -> KernelPlan:
    """Every kernel that writes or reads the pages, or computes what goes into them, one
    configuration each: the unified kernel's configurations differ only in tiles, and
    test_gpu_fp8_kv.py runs each over fp8 pages. Split-K decode (the merge in the launch) at every
    batch bucket. Matmuls stay cuBLAS, as on the torch path: they read no pages."""
    from alise.worker.kernels import triton_unified

    group = runner.config.num_attention_heads // runner.kv_cache.shape.num_kv_heads
    unified = next(c for c in triton_unified.CANDIDATES if c.block_m >= group)
    return KernelPlan(fused_norm=True, fused_rope=True, fused_act=True,
                      decode_splits=dict.fromkeys(decode_buckets(MAX_NUM_SEQS), 4), fused_merge=True,
                      unified=dict.fromkeys(token_buckets(runner.max_num_tokens), unified))


def make_runner(loaded: LoadedModel, num_blocks: int, kind: str, kv_cache_dtype: str) -> ModelRunner:
    kwargs = dict(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=MAX_NUM_SEQS, max_num_tokens=256,
                  kv_cache_dtype=kv_cache_dtype, fast_kernels=False, use_cuda_graphs=False)
    if kind == "torch":
        return ModelRunner(loaded, attention_backend="torch", **kwargs)
    runner = ModelRunner(loaded, **kwargs)
    runner.ops.plan = page_plan(runner)
    if not runner.spec.has_moe:
        runner.decode_graphs = runner.make_decode_graphs(MAX_NUM_SEQS)
        pool = runner.decode_graphs.capture()
        runner.mixed_graphs = runner.make_mixed_graphs()
        runner.mixed_graphs.capture(pool)
    return runner


def stacked(got: dict) -> torch.Tensor:
    return torch.stack([logits.float() for name in sorted(got) for _, logits in got[name]])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp8_pages_fast_path_matches_torch_path(name: str) -> None:
    loaded = build_fp16(name)
    tokens, tables, num_blocks = schedule_inputs(loaded.config.vocab_size)
    logits = {}
    for kind in ("torch", "fast"):
        for kv in ("fp8_e4m3", "auto"):
            runner = make_runner(loaded, num_blocks, kind, kv)
            assert runner.kv_cache.dtype == (torch.float8_e4m3fn if kv == "fp8_e4m3" else torch.float16)
            got, _ = run_schedule(runner, tokens, tables)
            if kind == "fast" and not runner.spec.has_moe:
                assert runner.decode_graphs.is_captured and runner.mixed_graphs.num_replays >= 4
            logits[kind, kv] = stacked(got)
            del runner
    paths_fp16 = relative(logits["fast", "auto"], logits["torch", "auto"])
    paths_fp8 = relative(logits["fast", "fp8_e4m3"], logits["torch", "fp8_e4m3"])
    fp8_cost = relative(logits["fast", "fp8_e4m3"], logits["fast", "auto"])
    torch_cost = relative(logits["torch", "fp8_e4m3"], logits["torch", "auto"])
    print(f"{name}: fast vs torch path on fp16 pages {paths_fp16:.2e}, on fp8 pages {paths_fp8:.2e}; "
          f"fp8 vs fp16 pages {fp8_cost:.2e} (fast), {torch_cost:.2e} (torch)")
    assert paths_fp16 < 2e-2  # fp16's rounding, in the attention kernels only (more where experts flip)
    assert paths_fp8 < fp8_cost / 2
    # The CPU measures 3.9e-2 (gemma2) to 1.6e-1 (mistral) and 4.4e-1 (mixtral, routing flips).
    assert 0 < fp8_cost < (6e-1 if name == "mixtral" else 2.5e-1)
