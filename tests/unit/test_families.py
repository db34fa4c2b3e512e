"""Every served family's paged forward equals transformers' own forward (float32, CPU).

Each case (tests/familycases.py) is a tiny checkpoint written to disk and loaded through
``load_model(directory)``; the mixed schedule (prompts, a prompt fed in two chunks beside decodes,
a late joiner, decodes) runs through each attention path of the torch backend: chunk by chunk,
fresh prompts batched, the unified reference, and the graphs' static buffers (decode and mixed
steps, run eagerly on the CPU). Tolerance: max |ours - HF| <= 1e-4 x max(1, max |HF logit|), as
in test_model_runner. Negative controls: with the window, the soft-cap or Gemma 3's second rotary
table left out, the same comparison fails by orders of magnitude.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alise.worker.kernels.triton_unified import UnifiedConfig
from alise.worker.model.kernel_plan import KernelPlan
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.runner import ModelRunner
from familycases import BLOCK_SIZE, CASES, NUM_BLOCKS, hf_logits, make_sequences, max_error, run_schedule
from tinymodels import make_tiny_model_dir

MODES = ["per-chunk", "fresh-batched", "unified", "graph-buffers"]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LoadedModel, dict]:
    family, overrides, max_model_len = CASES[request.param]
    path = make_tiny_model_dir(tmp_path_factory.mktemp(request.param), family, initializer_range=0.1, **overrides)
    loaded = load_model(str(path), max_model_len=max_model_len)
    tokens, tables = make_sequences(seed=1, vocab_size=loaded.config.vocab_size)
    return request.param, loaded, dict(tokens=tokens, tables=tables, reference=hf_logits(loaded.model, tokens))


def tolerance(reference: dict[str, torch.Tensor]) -> float:
    return 1e-4 * max(1.0, max(r.abs().max().item() for r in reference.values()))


def make_runner(loaded: LoadedModel, mode: str) -> ModelRunner:
    runner = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=32)
    runner.min_batched_fresh = 3 if mode == "fresh-batched" else 0
    if mode in ("unified", "graph-buffers"):
        runner.ops.plan = KernelPlan(unified={16: UnifiedConfig(), 32: UnifiedConfig()})
    if mode == "graph-buffers":
        runner.decode_graphs = runner.make_decode_graphs(8)
        runner.mixed_graphs = runner.make_mixed_graphs()
    return runner


@pytest.mark.parametrize("mode", MODES)
def test_logits_match_transformers(case: tuple[str, LoadedModel, dict], mode: str) -> None:
    name, loaded, data = case
    runner = make_runner(loaded, mode)
    got = run_schedule(runner, data["tokens"], data["tables"], every_position=mode != "graph-buffers")
    if mode == "graph-buffers":
        assert runner.mixed_graphs.num_replays == 0  # eager on the CPU, through the static buffers
    assert sum(len(rows) for rows in got.values()) >= (9 if mode == "graph-buffers" else 40)
    err = max_error(got, data["reference"])
    assert err <= tolerance(data["reference"]), f"{name} {mode}: max |ours - HF| = {err:.3g}"


def without(spec, what: str):
    """``spec`` with one departure from a plain decoder removed (a negative control)."""
    if what == "window":
        return dataclasses.replace(spec, layers=tuple(dataclasses.replace(layer, window=None) for layer in spec.layers))
    if what == "softcap":
        return dataclasses.replace(spec, attn_softcap=None)
    # Gemma 3's local layers read the global table instead of their own base.
    return dataclasses.replace(spec, layers=tuple(dataclasses.replace(layer, rope="full_attention")
                                                  for layer in spec.layers))


@pytest.mark.parametrize(("name", "what"), [("mistral", "window"), ("gemma2", "window"), ("gemma2", "softcap"),
                                            ("gemma3", "rope-table")])
def test_each_departure_is_needed(name: str, what: str, tmp_path) -> None:
    family, overrides, _ = CASES[name]
    loaded = load_model(str(make_tiny_model_dir(tmp_path, family, initializer_range=0.1, **overrides)))
    tokens, tables = make_sequences(seed=1, vocab_size=loaded.config.vocab_size)
    reference = hf_logits(loaded.model, tokens)
    runner = make_runner(loaded, "per-chunk")
    runner.spec = without(runner.spec, what)
    err = max_error(run_schedule(runner, tokens, tables, every_position=True), reference)
    assert err > 100 * tolerance(reference), f"{name} without its {what}: max |ours - HF| = {err:.3g}"


def test_specs_say_what_each_family_is(case: tuple[str, LoadedModel, dict]) -> None:
    name, loaded, _ = case
    spec = ModelRunner(loaded, num_blocks=4, block_size=BLOCK_SIZE).spec
    windows = {"qwen2": (None, 5), "qwen2-tied": (None, 5), "qwen3": (None, 5), "mistral": (5, 5), "phi3": (5, 5),
               "phi3-longrope-partial": (5, 5), "gemma2": (5, None, 5), "gemma3": (5, None, 5), "mixtral": (5, 5)}
    assert spec.windows == windows.get(name, (None, None)), name
    assert (spec.norm == "rms_unit_offset") == name.startswith("gemma")
    assert (spec.paths.q_norm is not None) == (name in ("qwen3", "gemma3", "qwen3-moe"))
    assert spec.has_moe == (name in ("mixtral", "qwen3-moe"))
    assert spec.attn_softcap == (2.0 if name == "gemma2" else None)
    assert spec.scale == pytest.approx(24 ** -0.5 if name.startswith("gemma") else 16 ** -0.5)
    assert [t.rotary_dim for t in spec.rope_tables][0] == (8 if name == "phi3-longrope-partial" else 16)
