"""The fast GPU runner (Triton attention, CUDA graphs) against transformers, same weights.

Six sequences share a batch: prompts of different lengths prefilled together, one prefilled in
two chunks beside decodes, one leaving early, one joining late; then teacher-forced decode
(the next true token is fed whatever was predicted) for 64 steps each. Pure-decode steps replay
CUDA graphs (batch 5 or 6 in the 8-bucket: padding rows too). Three kernel plans:

- ``torch-plan``: no start-up planning (cuBLAS, torch norms, per-chunk prefill attention, mixed
  steps eager): the runner as it was before the fused kernels;
- ``tuned``: the plan the runner picks on this device at start-up (whatever it keeps), on Llama bf16;
- ``all-fast``: every fused kernel forced on (add + norm, rotary + page write, SiLU-and-multiply,
  skinny matmuls up to 16 rows, split-K decode with the merge in the launch, the unified kernel)
  and every mixed step replayed from a mixed-step graph, so each kernel and graph path is checked
  whatever the timings chose.

With random weights greedy tokens flip on near-ties, so logits are compared: at every step and
position, ``max |ours - ref32|`` against the float32 transformers forward must stay within what
rounding in the model's dtype allows, which the test measures on transformers itself in that
dtype (``max |hf16 - ref32|``): ours <= 2 x that + 1e-3 x max |ref|. CUDA only.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

# Before any kernel module is imported: on a machine without CUDA the interpreter tests of
# tests/unit import them (compiled for the interpreter) in this same process.
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kernel_plan import KernelPlan
from alise.worker.model.loader import LoadedModel
from alise.worker.model.runner import ModelRunner

triton_attention = pytest.importorskip("alise.worker.kernels.triton_attention")
pytestmark = pytest.mark.skipif(not triton_attention.is_available(), reason="needs CUDA and Triton")

BLOCK_SIZE = 16
NUM_DECODE = 64
# name: (prompt length, step it joins at, prefill chunk sizes, decode steps)
SEQUENCES = {
    "a": (45, 0, [45], NUM_DECODE),
    "b": (200, 0, [200], NUM_DECODE),
    "c": (7, 0, [7], 20),
    "d": (128, 1, [128], NUM_DECODE),
    "e": (333, 2, [200, 133], NUM_DECODE),
    "f": (64, 10, [64], NUM_DECODE),
}

MODELS = {
    "opt-125m": (OPTConfig, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                                 vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768,
                                 do_layer_norm_before=True, init_std=0.05)),
    "llama-gqa": (LlamaConfig, dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
                                    max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.05,
                                    tie_word_embeddings=False)),
}


def build(name: str, dtype: torch.dtype) -> tuple[LoadedModel, torch.nn.Module]:
    """The model in ``dtype`` on the GPU and a float32 copy of the same weights."""
    config_cls, fields = MODELS[name]
    config = config_cls(**fields)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    reference = copy.deepcopy(model).float()
    family = "opt" if config_cls is OPTConfig else "llama"
    loaded = LoadedModel(model=model, tokenizer=None, config=model.config, family=family, name=name,
                         random_weights=True, max_model_len=config.max_position_embeddings, eos_token_id=None,
                         device=torch.device("cuda"), dtype=dtype)
    return loaded, reference


def schedule_inputs(vocab_size: int) -> tuple[dict[str, list[int]], dict[str, list[int]], int]:
    """SEQUENCES' tokens (random ids, seed 1), their block tables over shuffled blocks (so no
    sequence's pages are contiguous) and the number of blocks."""
    rng = random.Random(1)
    tokens = {n: [rng.randrange(3, vocab_size) for _ in range(p + d)] for n, (p, _, _, d) in SEQUENCES.items()}
    num_blocks = sum(-(-len(t) // BLOCK_SIZE) for t in tokens.values())
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = {}
    for n, t in tokens.items():
        k = -(-len(t) // BLOCK_SIZE)
        tables[n], free = free[:k], free[k:]
    return tokens, tables, num_blocks


def run_schedule(runner: ModelRunner, tokens: dict[str, list[int]], tables: dict[str, list[int]]):
    """Feeds SEQUENCES step by step; returns {name: [(position, logits)]} and the pure-decode step count."""
    pending = {name: list(chunks) for name, (_, _, chunks, _) in SEQUENCES.items()}
    decodes_left = {name: spec[3] for name, spec in SEQUENCES.items()}
    cached = dict.fromkeys(SEQUENCES, 0)
    got: dict[str, list] = {name: [] for name in SEQUENCES}
    num_pure_decode = 0
    step = 0
    while any(decodes_left.values()):
        feeds = {}
        for name, (_, join, _, _) in SEQUENCES.items():
            if step < join or not decodes_left[name]:
                continue
            if pending[name]:
                feeds[name] = pending[name].pop(0)
            else:
                feeds[name] = 1
                decodes_left[name] -= 1
        chunks = [SeqChunk(tokens[n][cached[n]:cached[n] + k], cached[n], tables[n]) for n, k in feeds.items()]
        num_pure_decode += all(k == 1 for k in feeds.values())
        logits = runner.execute(chunks)
        for row, (name, k) in enumerate(feeds.items()):
            cached[name] += k
            got[name].append((cached[name] - 1, logits[row]))
        step += 1
    return got, num_pure_decode


def forced_plan(runner: ModelRunner) -> KernelPlan:
    from alise.worker.kernels import triton_fused, triton_unified
    from alise.worker.model.cuda_graphs import token_buckets

    group = runner.config.num_attention_heads // runner.kv_cache.shape.num_kv_heads
    configs = [c for c in triton_unified.CANDIDATES if c.block_m >= group]
    candidates = triton_fused.SKINNY_CANDIDATES
    matrix = [c for c in candidates if not c.vector]
    skinny = {(w.shape[0], w.shape[1], rows): candidates[-1] if rows == 1 else matrix[rows % len(matrix)]
              for _, w, _, _ in runner._matmuls(0) for rows in range(1, triton_fused.MAX_SKINNY_ROWS + 1)}
    # Split-K with the merge in the launch at decode batches 1 and 2 (the schedule's last steps).
    return KernelPlan(fused_norm=True, fused_rope=True, fused_act=True, linear=skinny,
                      decode_splits={1: 8, 2: 4}, fused_merge=True,
                      unified={t: configs[i % len(configs)]
                               for i, t in enumerate(token_buckets(runner.max_num_tokens))})


def make_runner(loaded: LoadedModel, num_blocks: int, mode: str) -> ModelRunner:
    kwargs = dict(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=256)
    if mode == "tuned":
        return ModelRunner(loaded, **kwargs)
    runner = ModelRunner(loaded, **kwargs, fast_kernels=False, use_cuda_graphs=mode == "torch-plan")
    if mode == "all-fast":
        runner.ops.plan = forced_plan(runner)
        runner.decode_graphs = runner.make_decode_graphs(8)
        pool = runner.decode_graphs.capture()
        runner.mixed_graphs = runner.make_mixed_graphs()
        runner.mixed_graphs.capture(pool)
    return runner


# (model, dtype, kernel plan, min_batched_fresh): the torch plan with fresh prompts one by one and
# batched; every fast kernel forced on for every model and dtype; the tuned plan once (start-up
# planning costs tens of seconds of kernel compiles; bench/gpu/engine_compare.py checks the tuned
# OPT-13B engine's logits against the torch plan's).
RUNS = [(m, d, mode, fresh) for m, d in (("opt-125m", torch.float16), ("llama-gqa", torch.float16),
                                        ("llama-gqa", torch.bfloat16))
        for mode, fresh in (("torch-plan", 0), ("torch-plan", 3), ("all-fast", 3))]
RUNS += [("llama-gqa", torch.bfloat16, "tuned", 3)]


@pytest.mark.parametrize(("name", "dtype", "mode", "min_batched_fresh"), RUNS,
                         ids=[f"{m}-{str(d)[6:]}-{mode}-fresh{f}" for m, d, mode, f in RUNS])
def test_teacher_forced_logits_match_transformers(name: str, dtype: torch.dtype, mode: str,
                                                  min_batched_fresh: int) -> None:
    loaded, reference = build(name, dtype)
    tokens, tables, num_blocks = schedule_inputs(loaded.config.vocab_size)
    # HF first: the runner turns the HF projections into views of its fused weights.
    with torch.inference_mode():
        ref32 = {n: reference(torch.tensor([t], device="cuda")).logits[0].float() for n, t in tokens.items()}
        hf_low = {n: loaded.model(torch.tensor([t], device="cuda")).logits[0].float() for n, t in tokens.items()}
    runner = make_runner(loaded, num_blocks, mode)
    assert runner.decode_graphs is not None and runner.decode_graphs.is_captured
    runner.min_batched_fresh = min_batched_fresh  # step 0 feeds three fresh prompts: a, b, c
    replays_before = runner.mixed_graphs.num_replays if runner.mixed_graphs is not None else 0
    got, num_pure_decode = run_schedule(runner, tokens, tables)
    assert num_pure_decode >= 40
    mixed_replays = (runner.mixed_graphs.num_replays - replays_before) if runner.mixed_graphs is not None else 0
    if mode == "all-fast":
        assert mixed_replays >= 4  # every step with prefill tokens fits a 256-row bucket
    if mode == "tuned":
        print(f"tuned plan for {name} {dtype}:\n  " + "\n  ".join(runner.plan.report))

    hf_err = max((hf_low[n] - ref32[n]).abs().max().item() for n in tokens)
    scale = max(ref32[n].abs().max().item() for n in tokens)
    bound = 2 * hf_err + 1e-3 * scale
    worst = 0.0
    num_steps = 0
    for n, steps in got.items():
        for pos, logits in steps:
            err = (logits - ref32[n][pos]).abs().max().item()
            worst = max(worst, err)
            num_steps += 1
            assert err <= bound, f"{n} position {pos}: |ours - ref32| = {err:.3g} > {bound:.3g}"
    print(f"engine-vs-hf {name} {dtype} {mode}: {num_steps} compared positions ({num_pure_decode} decode graph "
          f"steps, {mixed_replays} mixed graph steps), max|ours-ref32| {worst:.3e}, max|hf-ref32| {hf_err:.3e}, "
          f"max|ref| {scale:.1f}")
