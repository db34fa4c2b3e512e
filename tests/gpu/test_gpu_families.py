"""Every served family on the GPU, with the Triton kernels and CUDA graphs, against transformers.

Per family, a model of moderate size (hidden 1024, 4 layers; Gemma with its 256-wide heads) with
what makes the family: 64-token sliding windows (the prompts run to 333 tokens, so windows cut
and the kernels skip pages), Gemma 2's attention and final soft-caps, Gemma 3's two rotary
tables, Llama 3's rotary scaling, Phi-3's fused projections, routed experts. The schedule and
the bound are test_gpu_engine_vs_transformers's: six sequences (prompts prefilled together, one
in two chunks beside decodes, a late joiner), teacher-forced decodes, every logit within
``2 x max |hf_low - ref32| + 1e-3 x max |ref32|`` of transformers' float32 forward, where
``hf_low`` is transformers itself in the model's dtype. Modes: ``all-fast`` (every fused kernel
forced on, decode and mixed steps replayed from CUDA graphs; routed experts run the same plan
eagerly: they cannot be captured) and ``tuned`` (the plan the runner picks at start-up). CUDA only.
"""

from __future__ import annotations

import copy

import pytest
import torch

# Before any kernel module is imported: on a machine without CUDA the interpreter tests of
# tests/unit import them (compiled for the interpreter) in this same process.
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_gpu_engine_vs_transformers import BLOCK_SIZE, forced_plan, run_schedule, schedule_inputs

from alise.worker.model.families import describe
from alise.worker.model.loader import LoadedModel
from alise.worker.model.runner import ModelRunner
from tinymodels import tiny_config, tiny_model

triton_attention = pytest.importorskip("alise.worker.kernels.triton_attention")
pytestmark = pytest.mark.skipif(not triton_attention.is_available(), reason="needs CUDA and Triton")

_COMMON = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, initializer_range=0.05,
               sliding_window=64)
_GEMMA = dict(head_dim=256, num_key_value_heads=4, query_pre_attn_scalar=192)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=256)

#: name -> (family, overrides of the common fields)
CASES = {
    "llama3-rope": ("llama", dict(rope_parameters=_LLAMA3_ROPE)),
    "qwen2": ("qwen2", dict(max_window_layers=2)),  # layers 2 and 3 windowed; QKV biases
    "qwen3": ("qwen3", dict(head_dim=128, max_window_layers=2)),
    "mistral": ("mistral", {}),
    "phi3": ("phi3", dict(num_key_value_heads=8, original_max_position_embeddings=2048)),
    "gemma2": ("gemma2", _GEMMA | dict(attn_logit_softcapping=5.0, final_logit_softcapping=10.0)),
    "gemma3": ("gemma3", _GEMMA | dict(sliding_window_pattern=2)),
    "mixtral": ("mixtral", dict(intermediate_size=1024)),
    "qwen3-moe": ("qwen3_moe", dict(head_dim=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
                                    mlp_only_layers=[0])),
}

RUNS = [(name, torch.bfloat16, "all-fast") for name in CASES]
RUNS += [(name, torch.float16, "all-fast") for name in ("llama3-rope", "qwen2", "mistral", "phi3")]
RUNS += [("qwen2", torch.bfloat16, "tuned"), ("gemma2", torch.bfloat16, "tuned")]


def build(name: str, dtype: torch.dtype) -> tuple[LoadedModel, torch.nn.Module]:
    """The model in ``dtype`` on the GPU and a float32 copy of the same weights."""
    family, overrides = CASES[name]
    model = tiny_model(tiny_config(family, **(_COMMON | overrides)))
    reference = copy.deepcopy(model).cuda()
    model = model.to(device="cuda", dtype=dtype)
    spec = describe(model.config)
    loaded = LoadedModel(model=model, tokenizer=None, config=model.config, family=spec.family, name=name,
                         random_weights=True, max_model_len=model.config.max_position_embeddings, eos_token_id=None,
                         device=torch.device("cuda"), dtype=dtype)
    return loaded, reference


def make_runner(loaded: LoadedModel, num_blocks: int, mode: str) -> ModelRunner:
    kwargs = dict(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=256)
    if mode == "tuned":
        return ModelRunner(loaded, **kwargs)
    runner = ModelRunner(loaded, **kwargs, fast_kernels=False, use_cuda_graphs=False)
    runner.ops.plan = forced_plan(runner)
    if not runner.spec.has_moe:
        runner.decode_graphs = runner.make_decode_graphs(8)
        pool = runner.decode_graphs.capture()
        runner.mixed_graphs = runner.make_mixed_graphs()
        runner.mixed_graphs.capture(pool)
    return runner


@pytest.mark.parametrize(("name", "dtype", "mode"), RUNS, ids=[f"{n}-{str(d)[6:]}-{m}" for n, d, m in RUNS])
def test_family_matches_transformers(name: str, dtype: torch.dtype, mode: str) -> None:
    loaded, reference = build(name, dtype)
    tokens, tables, num_blocks = schedule_inputs(loaded.config.vocab_size)
    # HF first: the runner turns the HF projections into views of its fused weights.
    with torch.inference_mode():
        ref32 = {n: reference(torch.tensor([t], device="cuda")).logits[0].float() for n, t in tokens.items()}
        hf_low = {n: loaded.model(torch.tensor([t], device="cuda")).logits[0].float() for n, t in tokens.items()}
    runner = make_runner(loaded, num_blocks, mode)
    moe = runner.spec.has_moe
    assert (runner.decode_graphs is None) == moe
    got, num_pure_decode = run_schedule(runner, tokens, tables)
    assert num_pure_decode >= 40
    if mode == "all-fast" and not moe:
        assert runner.decode_graphs.is_captured and runner.mixed_graphs.num_replays >= 4
    if mode == "tuned":
        print(f"tuned plan for {name} {dtype}:\n  " + "\n  ".join(runner.plan.report))
    hf_err = max((hf_low[n] - ref32[n]).abs().max().item() for n in tokens)
    scale = max(ref32[n].abs().max().item() for n in tokens)
    bound = 2 * hf_err + 1e-3 * scale
    worst = max((logits - ref32[n][pos]).abs().max().item() for n, steps in got.items() for pos, logits in steps)
    print(f"family {name} {dtype} {mode}: max|ours-ref32| {worst:.3e}, max|hf-ref32| {hf_err:.3e}, "
          f"max|ref| {scale:.1f}, windows {runner.spec.windows}")
    assert worst <= bound, f"{name}: max |ours - ref32| = {worst:.3g} > {bound:.3g}"
