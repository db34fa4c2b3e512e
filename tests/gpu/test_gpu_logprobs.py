"""Logprobs on CUDA: the synchronous step's are the log-softmax of the runner's raw logits (decode
graphs replayed or not); overlapped steps report the synchronous ones, read back with the ids
from pinned memory; and neither computing them nor launching a step whose rows ask for them
waits for the stream. CUDA only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from alise.core.commands import StepPlan
from alise.core.sampling import SamplingParams
from alise.worker.model.overlap import PinnedUploads
from alise.worker.model.sampler import Sampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
import test_async_steps as unit  # noqa: E402
import test_gpu_async_steps as gpu  # noqa: E402
import test_logprobs_engine as logprobs  # noqa: E402

from alise.worker.model.loader import load_model  # noqa: E402
from tinymodels import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")
    return load_model(str(path), device="cuda", dtype="float16")


@pytest.mark.parametrize("graphs", [True, False])
def test_synchronous_logprobs_on_cuda_are_the_log_softmax_of_the_raw_logits(loaded, graphs):
    engine = gpu.make_engine(loaded, graphs)
    steps = []
    execute = engine.executor.runner.execute

    def recording(chunks, **kwargs):
        out = execute(chunks, **kwargs)
        steps.append(out.float().cpu())
        return out

    engine.executor.runner.execute = recording
    commands = logprobs.admits()
    wants = {a.job_id: a.sampling.logprobs for a in commands}
    reports = [engine.run(StepPlan(0, commands=commands, chunks={a.job_id: len(a.token_ids) for a in commands},
                                   run_step=True))]
    reports += [engine.run(StepPlan(i, run_step=True)) for i in range(1, 8)]
    for report, raw in zip(reports, steps, strict=True):
        for out, row in zip(report.outputs, raw, strict=True):
            logprobs.check(out, row, wants[out.job_id], tolerance=1e-3)
    print(f"graphs={graphs}: {sum(len(r.outputs) for r in reports)} tokens checked")


@pytest.mark.parametrize("graphs", [True, False])
def test_overlapped_logprobs_on_cuda_are_the_synchronous_ones(loaded, graphs):
    commands = {0: logprobs.admits()[:2], 2: logprobs.admits()[2:]}
    plans, expected = unit.make_plans(gpu.make_engine(loaded, graphs), commands, {})
    got = unit.run_overlapped(gpu.make_engine(loaded, graphs), plans, {})
    assert unit.outputs(got) == unit.outputs(expected)
    logprobs.assert_same_logprobs(expected, got, tolerance=1e-3)


def test_logprobs_never_wait_for_the_stream():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000, device="cuda")
    ids = torch.tensor([5, 6, 7, 8], device="cuda")
    params = [SamplingParams(logprobs=5), SamplingParams(), SamplingParams(logprobs=0), SamplingParams(logprobs=20)]
    upload = PinnedUploads(torch.device("cuda"))
    done = gpu.busy_stream(1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_device = Sampler.logprobs(logits, params, ids, upload)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not done.query()  # queued behind the busy stream: nothing waited for it
    rows = on_device.unpack(on_device.packed.cpu())
    expected = torch.log_softmax(logits.double(), dim=-1).cpu()
    assert rows[1] is None and rows[2].top_ids == () and len(rows[3].top_ids) == 20
    for i in (0, 2, 3):
        assert rows[i].logprob == pytest.approx(expected[i, ids[i].item()].item(), abs=1e-5)


def test_a_step_whose_rows_ask_for_logprobs_is_launched_behind_a_busy_step_without_waiting(loaded):
    commands = {0: logprobs.admits()}
    plans, expected = unit.make_plans(gpu.make_engine(loaded, True), commands, {})
    engine = gpu.make_engine(loaded, True)
    waited = []

    def timed_launch(plan, flight):
        done = gpu.busy_stream(0.3) if flight is not None else None
        step = engine.launch(plan, flight)
        if done is not None:
            waited.append(done.query())
        return step

    got = unit.run_overlapped(engine, plans, {}, launch=timed_launch)
    assert unit.outputs(got) == unit.outputs(expected)
    logprobs.assert_same_logprobs(expected, got, tolerance=1e-3)
    assert len(waited) >= 10 and not any(waited), waited
    print(f"{len(waited)} launches behind a busy stream, none waited")
