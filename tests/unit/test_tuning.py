"""The start-up kernel planner, run whole on the CPU under the Triton interpreter.

Timings here are wall clock of interpreted kernels and mean nothing; what is checked is that
every decision runs (checks pass on correct kernels, no step fails), that the plan covers the
runner's buckets, and that the runner with the chosen plan and its mixed-step buffers still
computes transformers' logits. The GPU runs the same code graph-timed (tests/gpu, bench/engine.py).

Run: ``pip install -e '.[kernels]'`` then ``pytest tests/unit/test_tuning.py`` (about a minute on
a loaded 2-core machine; skipped where Triton is missing or a GPU is present).
"""

from __future__ import annotations

import pytest
from kernelkit import interpreted
from test_model_runner import BLOCK_SIZE, NUM_BLOCKS, SCHEDULE, hf_logits, make_sequences, tolerance

from alise.worker.model.attention import triton_backend
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.runner import ModelRunner

triton_attention = interpreted("alise.worker.kernels.triton_attention")
interpreted("alise.worker.kernels.triton_unified")
interpreted("alise.worker.kernels.triton_fused")
tuning = interpreted("alise.worker.model.tuning")
from alise.worker.model.timing import wall_time_s  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request: pytest.FixtureRequest, tiny_llama_dir, tiny_opt_dir) -> LoadedModel:
    return load_model(str(tiny_llama_dir if request.param == "llama" else tiny_opt_dir))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # padding rows, see test_fused_runner
def test_planner_runs_every_decision_and_the_plan_computes_the_same(tiny: LoadedModel) -> None:
    runner = ModelRunner(tiny, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=2, max_num_tokens=16,
                         fast_kernels=False, use_cuda_graphs=False)
    runner.attention_backend = triton_backend()
    plan = tuning.plan_kernels(runner, timer=wall_time_s)
    assert not [line for line in plan.report if "failed" in line or "left out" in line], plan.report
    assert sorted(plan.unified) == [16]
    assert sorted(plan.decode_splits) == [1, 2]
    assert any(line.startswith("add_norm") for line in plan.report)
    assert any(line.startswith("matmul qkv") for line in plan.report)
    assert (tiny.family == "llama") == any(line.startswith("rope_write_kv") for line in plan.report)
    assert (tiny.family == "llama") == any(line.startswith("act_mul") for line in plan.report)
    assert not runner.kv_cache.key_cache.any()  # the planner's random K/V are gone again

    runner.ops.plan = plan
    runner.mixed_graphs = runner.make_mixed_graphs()
    tuning.keep_faster_mixed_graphs(runner)
    assert set(plan.mixed_graph_tokens) <= {16}
    assert any(line.startswith("mixed step of 16 rows") for line in plan.report)
    tokens, tables = make_sequences(seed=5)
    cached = dict.fromkeys(tokens, 0)
    got: dict[str, list] = {name: [] for name in tokens}
    for step in SCHEDULE:
        chunks = [SeqChunk(tokens[n][cached[n]:cached[n] + k], cached[n], tables[n]) for n, k in step.items()]
        logits = runner.execute(chunks)
        for row, (name, k) in enumerate(step.items()):
            cached[name] += k
            got[name].append((cached[name] - 1, logits[row]))
    for name, ids in tokens.items():
        reference = hf_logits(tiny, ids)
        for pos, logits in got[name]:
            assert (logits - reference[pos]).abs().max().item() <= tolerance(reference), (name, pos)
