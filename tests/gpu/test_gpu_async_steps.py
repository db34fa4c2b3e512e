"""Overlapped steps on CUDA (Triton attention, decode graphs replayed, sampled ids copied to
pinned memory without a wait): the scenario of ``tests/unit/test_async_steps.py`` (chunked
prefill, a stop while in the next plan, an abort, a swap and a drop with their resumes, greedy
and seeded sampling) gives the synchronous engine's tokens; eager mixed steps (no graph
replayed) upload their inputs without waiting for the step ahead. CUDA only."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from alise.worker.kernels.triton_unified import UnifiedConfig
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.kernel_plan import KernelPlan
from alise.worker.model.loader import load_model
from alise.worker.model.overlap import PinnedUploads, TokenGather
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


def busy_stream(seconds: float) -> torch.cuda.Event:
    """Queues ``seconds`` of spinning on the current stream; the event fires when it ends."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10 ** 7)
    end.record()
    end.synchronize()
    cycles_per_s = 10 ** 7 / (start.elapsed_time(end) / 1e3)
    torch.cuda._sleep(int(seconds * cycles_per_s))
    done = torch.cuda.Event()
    done.record()
    return done


def test_pinned_uploads_never_wait_for_the_stream():
    upload = PinnedUploads(torch.device("cuda"))
    done = busy_stream(1.0)
    outs = [upload([[i, i + 1], [i + 2, i + 3]], torch.int64) for i in range(100)]
    assert not done.query()  # 100 uploads queued behind the busy stream, none waited for it
    assert upload.num_slots == 100  # no staging buffer was refilled before its copy ran
    torch.cuda.synchronize()
    assert all(o.tolist() == [[i, i + 1], [i + 2, i + 3]] for i, o in enumerate(outs))
    again = upload(torch.arange(6).view(2, 3), torch.float32)
    assert again.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and upload.num_slots == 100  # a slot reused


@pytest.mark.parametrize("plan", ["split", "unified"])
def test_eager_mixed_steps_launched_behind_a_busy_step_do_not_wait(tmp_path, plan):
    """Each mixed step (decode graphs replayed for the all-decode ones; the mixed steps eager,
    attention per chunk or in one unified call) is launched behind the step before it and
    half a second of spinning: the launch returns before the spinning ends, and the tokens
    are the synchronous engine's."""
    path = make_tiny_model_dir(tmp_path / "llama", "llama")
    loaded = load_model(str(path), device="cuda", dtype="float16")

    def engine():
        e = make_engine(loaded, graphs=True)
        if plan == "unified":
            e.executor.runner.ops.plan = KernelPlan(unified={16: UnifiedConfig(), 64: UnifiedConfig()})
        assert e.executor.runner.mixed_graphs is None
        return e

    commands, aborts = unit.script(None)
    plans, expected = unit.make_plans(engine(), commands, aborts)
    eng = engine()
    runner = eng.executor.runner
    waited, launch_s = [], []

    def timed_launch(p, flight):
        mixed = any(n > 1 for n in p.chunks.values())  # eager: no mixed-step graphs
        done = busy_stream(0.5) if flight is not None and mixed else None
        start = time.perf_counter()
        step = eng.launch(p, flight)
        if done is not None:
            launch_s.append(time.perf_counter() - start)
            waited.append(done.query())
        return step

    reports = unit.run_overlapped(eng, plans, aborts, launch=timed_launch)
    assert unit.outputs(reports) == unit.outputs(expected)
    assert len(waited) >= 3 and not any(waited), (waited, launch_s)
    assert runner.decode_graphs is not None
