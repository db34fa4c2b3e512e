"""Families with every fast kernel on (Triton, under the interpreter) against transformers.

The plan of test_fused_runner (fused add + norm, rotary + page write, gated activation, skinny
matmuls, the Triton decode and unified kernels) on the families whose layers depart from Llama's:
Gemma 2 (unit-offset RMSNorm in the fused norm, GELU-tanh in the fused activation, sliding windows
and the logit soft-cap inside both attention kernels, the final soft-cap), Qwen3 (q/k norms by the
fused norm before the fused rotary), Phi-3 with partial rotary (the rotary falls back to torch)
and Qwen3-MoE (routed experts beside the fused dense layer). Gemma 2 and Qwen3 run through the
graphs' static buffers too. Tolerance as in test_families (float32).

Run: ``pip install -e '.[kernels]'`` then ``pytest tests/unit/test_family_kernels.py`` (under a
minute on a loaded 2-core machine; skipped where Triton is missing or a GPU is present).
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
from kernelkit import interpreted
from test_fused_runner import counting, fused_runner

from alise.worker.model.loader import load_model
from familycases import CASES, hf_logits, make_sequences, max_error, run_schedule
from tinymodels import make_tiny_model_dir

triton_attention = interpreted("alise.worker.kernels.triton_attention")
interpreted("alise.worker.kernels.triton_unified")
triton_fused = interpreted("alise.worker.kernels.triton_fused")

RUNS = [("gemma2", "graph-buffers"), ("qwen3", "graph-buffers"), ("phi3-longrope-partial", "eager"),
        ("qwen3-moe", "eager")]


# Padding rows of a graph bucket hold whatever the buffer held (see test_fused_runner); a window
# may leave a padding row of a tile with no key (0 / 0 there, never stored).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(("name", "mode"), RUNS, ids=[f"{n}-{m}" for n, m in RUNS])
def test_family_with_fast_kernels_matches_transformers(name: str, mode: str, tmp_path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    family, overrides, max_model_len = CASES[name]
    loaded = load_model(str(make_tiny_model_dir(tmp_path, family, initializer_range=0.1, **overrides)),
                        max_model_len=max_model_len)
    tokens, tables = make_sequences(seed=2, vocab_size=loaded.config.vocab_size)
    reference = hf_logits(loaded.model, tokens)
    runner = fused_runner(loaded)
    calls: collections.Counter = collections.Counter()
    for fn in ("add_norm", "rope_write_kv", "act_mul", "skinny_linear"):
        monkeypatch.setattr(triton_fused, fn, counting(calls, fn, getattr(triton_fused, fn)))
    backend = runner.attention_backend
    runner.attention_backend = dataclasses.replace(
        backend, **{f: counting(calls, f, getattr(backend, f)) for f in ("decode_attention", "unified_attention")})
    if mode == "graph-buffers":
        runner.decode_graphs = runner.make_decode_graphs(8)
        runner.mixed_graphs = runner.make_mixed_graphs()
    got = run_schedule(runner, tokens, tables, every_position=False)
    expected = {"add_norm", "skinny_linear", "decode_attention", "unified_attention", "act_mul"}
    expected |= {"rope_write_kv"} if family != "phi3" else set()  # partial rotary stays in torch
    assert expected <= set(calls), f"kernels never called: {expected - set(calls)}"
    err = max_error(got, reference)
    bound = 1e-4 * max(1.0, max(r.abs().max().item() for r in reference.values()))
    assert err <= bound, f"{name} {mode}: max |ours - HF| = {err:.3g}"


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen3", "phi3-longrope-partial"])
def test_planner_checks_each_familys_kernels(name: str, tmp_path) -> None:
    """The start-up checks of the fused norm, activation and rotary pass on each family's own
    kinds (Gemma's unit-offset norm and GELU-tanh, Qwen3's RMSNorm); partial rotary stays torch."""
    tuning = interpreted("alise.worker.model.tuning")
    from alise.worker.model.timing import wall_time_s

    family, overrides, max_model_len = CASES[name]
    loaded = load_model(str(make_tiny_model_dir(tmp_path, family, **overrides)), max_model_len=max_model_len)
    runner = fused_runner(loaded)
    planner = tuning.Planner(runner, wall_time_s)
    for step in (planner.pick_norm, planner.pick_act, planner.pick_rope):
        step()
    report = planner.plan.report
    assert not [line for line in report if "left out" in line or "failed" in line], report
    assert any(line.startswith(f"add_norm ({runner.spec.norm}") for line in report), report
    activation = "gelu_tanh" if family.startswith("gemma") else "silu"
    assert any(line.startswith(f"act_mul ({activation}") for line in report), report
    rope = "partial rotary" if family == "phi3" else "rel err"
    assert any(line.startswith("rope_write_kv") and rope in line for line in report), report
