"""The runner with every fast kernel on (Triton, under the interpreter) against transformers.

The plan a GPU would choose at its best: fused add + norm, fused rotary + page write, the skinny
matmul for every projection of up to 16 rows, the Triton page write and decode kernel, and the
unified kernel for every step that is not all decodes; the same schedule as test_model_runner
(prompts, a chunk beside decodes, late joiners) run as plain eager steps and through the
mixed-step graphs' static buffers. Logits must match transformers' float32 forward as closely as
the torch path does (1e-4 x max(1, max |logit|)). This checks the wiring of the kernels into the
forward pass on the CPU; tests/gpu checks the same on the device, compiled.

Run: ``pip install -e '.[kernels]'`` then ``pytest tests/unit/test_fused_runner.py`` (about a
minute on a loaded 2-core machine; skipped where Triton is missing or a GPU is present).
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from kernelkit import interpreted
from test_model_runner import BLOCK_SIZE, NUM_BLOCKS, SCHEDULE, hf_logits, make_sequences, tolerance

from alise.worker.model.attention import triton_backend
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kernel_plan import KernelPlan
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.runner import ModelRunner

triton_attention = interpreted("alise.worker.kernels.triton_attention")
triton_unified = interpreted("alise.worker.kernels.triton_unified")
triton_fused = interpreted("alise.worker.kernels.triton_fused")


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request: pytest.FixtureRequest, tiny_llama_dir, tiny_opt_dir) -> LoadedModel:
    return load_model(str(tiny_llama_dir if request.param == "llama" else tiny_opt_dir))


def fused_runner(loaded: LoadedModel) -> ModelRunner:
    runner = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=32,
                         fast_kernels=False, use_cuda_graphs=False)
    runner.attention_backend = triton_backend()
    vector = next(c for c in triton_fused.SKINNY_CANDIDATES if c.vector)
    skinny = {(w.shape[0], w.shape[1], rows): vector if rows == 1 else triton_fused.SKINNY_CANDIDATES[rows % 2]
              for _, w, _, _ in runner._matmuls(0) for rows in range(1, 17)}
    runner.ops.plan = KernelPlan(fused_norm=True, fused_rope=True, fused_act=True, linear=skinny,
                                 unified={16: triton_unified.CANDIDATES[0], 32: triton_unified.CANDIDATES[2]})
    return runner


def counting(calls: collections.Counter, name: str, fn):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper


# Padding rows of a graph bucket belong to no sequence; their attention output is whatever the
# buffer held, and arithmetic on it may overflow (in those rows only: nothing reads them).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("through_graph_buffers", [False, True], ids=["eager", "mixed-graph-buffers"])
def test_fused_plan_matches_transformers(tiny: LoadedModel, through_graph_buffers: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runner = fused_runner(tiny)
    calls: collections.Counter = collections.Counter()
    for name in ("add_norm", "rope_write_kv", "act_mul", "skinny_linear"):
        monkeypatch.setattr(triton_fused, name, counting(calls, name, getattr(triton_fused, name)))
    backend = runner.attention_backend
    runner.attention_backend = dataclasses.replace(
        backend, **{f: counting(calls, f, getattr(backend, f)) for f in ("write_kv", "decode_attention",
                                                                          "unified_attention")})
    graphs = runner.make_mixed_graphs() if through_graph_buffers else None
    tokens, tables = make_sequences(seed=4)
    cached = dict.fromkeys(tokens, 0)
    got: dict[str, list[torch.Tensor]] = {name: [] for name in tokens}
    for step in SCHEDULE:
        chunks = [SeqChunk(tokens[name][cached[name]:cached[name] + n], cached[name], tables[name])
                  for name, n in step.items()]
        is_decode = all(n == 1 for n in step.values())
        if graphs is not None and not is_decode:
            logits = graphs.run(chunks, [True] * len(chunks))
        else:
            logits = runner.execute(chunks)
        for row, (name, n) in enumerate(step.items()):
            cached[name] += n
            got[name].append((cached[name] - 1, logits[row]))
    expected = {"add_norm", "skinny_linear", "decode_attention", "unified_attention"}
    expected |= {"rope_write_kv", "act_mul"} if tiny.family == "llama" else {"write_kv"}
    assert expected <= set(calls), f"kernels never called: {expected - set(calls)}"
    for name, ids in tokens.items():
        reference = hf_logits(tiny, ids)
        for pos, logits in got[name]:
            err = (logits - reference[pos]).abs().max().item()
            assert err <= tolerance(reference), f"{name} at {pos}: {err:.3g}"
