"""Overlapped steps on CUDA (Triton attention, decode graphs replayed, sampled ids copied to
pinned memory without a wait): the scenario of ``tests/unit/test_async_steps.py`` (chunked
prefill, a stop while in the next plan, an abort, a swap and a drop with their resumes, greedy
and seeded sampling) gives the synchronous engine's tokens. CUDA only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from alise.worker.model.executor import make_worker_engine
from alise.worker.model.loader import load_model
from alise.worker.model.overlap import TokenGather
from alise.worker.model.runner import ModelRunner
from tinymodels import make_tiny_model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

_spec = importlib.util.spec_from_file_location(
    "unit_async_steps", Path(__file__).parent.parent / "unit" / "test_async_steps.py")
unit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(unit)


def make_engine(loaded, graphs: bool):
    runner = ModelRunner(loaded, num_blocks=64, block_size=unit.BLOCK_SIZE, max_num_seqs=8, max_num_tokens=32,
                         fast_kernels=False, use_cuda_graphs=graphs)
    return make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len, num_host_blocks=32)


@pytest.mark.parametrize("graphs", [True, False])
def test_overlapped_steps_on_cuda_give_the_synchronous_tokens(tmp_path, graphs, monkeypatch):
    path = make_tiny_model_dir(tmp_path / "llama", "llama")
    loaded = load_model(str(path), device="cuda", dtype="float16")
    free = unit.streams(unit.make_plans(make_engine(loaded, graphs), *unit.script(None))[1])["stop"][0]
    index = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    commands, aborts = unit.script(free[index])
    plans, expected = unit.make_plans(make_engine(loaded, graphs), commands, aborts)
    gathered = []
    apply = TokenGather.apply
    monkeypatch.setattr(TokenGather, "apply", lambda self, ids: (gathered.append(len(self.rows)), apply(self, ids)))
    engine = make_engine(loaded, graphs)
    got = unit.run_overlapped(engine, plans, aborts)
    assert unit.outputs(got) == unit.outputs(expected)
    assert [r.refused for r in got] == [r.refused for r in expected]
    assert sum(gathered) >= 40
    assert all(r.step_duration_s > 0 for r in got if r.num_seqs)
    assert (engine.executor.runner.decode_graphs is not None) == graphs
