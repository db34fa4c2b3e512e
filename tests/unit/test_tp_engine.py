"""A tensor-parallel worker's engines (gloo, 2 processes): rank 0's driver engine, the other
rank following its messages, serves the same tokens with the same logits as one device's engine,
through chunked prefills beside decodes and each KV action on a paused job: swapped to host and
back, quantized to int8 and back, dropped and recomputed. The swapped and dropped jobs resume
with the logits of one device (float32: the all-reduces only reorder sums); the int8 one within
the rounding of its codes."""

from __future__ import annotations

import pytest
import torch

from alise.worker.model.executor import make_worker_engine
from alise.worker.model.loader import load_model
from alise.worker.model.serving import make_runner
from tinymodels import make_tiny_model_dir
from tpkit import engine_config, engine_plans, engine_rank, record_logits, spawn_ranks


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tp2_engine_serves_what_one_device_does(family: str, tmp_path) -> None:
    model_dir = str(make_tiny_model_dir(tmp_path / "model", family, initializer_range=0.1))
    spawn_ranks(engine_rank, 2, tmp_path, model_dir, str(tmp_path))
    tp2 = torch.load(tmp_path / "engine.pt", weights_only=False)

    config = engine_config(model_dir, 1)
    runner = make_runner(load_model(model_dir), config, 48)
    logits = record_logits(runner)
    engine = make_worker_engine(runner, eos_token_id=None, max_model_len=256, num_host_blocks=16)
    reports = [engine.run(plan) for plan in engine_plans()]

    assert tp2["num_blocks"] == 48
    assert [r.refused for r in tp2["reports"]] == [r.refused for r in reports] == [[]] * len(reports)
    outputs = [[(o.job_id, o.token_ids) for o in r.outputs] for r in reports]
    assert [[(o.job_id, o.token_ids) for o in r.outputs] for r in tp2["reports"]] == outputs
    assert sum(len(o) for o in outputs) > 40
    assert len(tp2["logits"]) == len(logits)
    int8_steps = range(7, 11)  # job a's KV quantized (steps 7-9) and dequantized (step 10 on)
    for step, (got, want) in enumerate(zip(tp2["logits"], logits, strict=True)):
        tol = (1e-3 if step >= int8_steps.start else 2e-5) * max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= tol, f"step {step}"


@pytest.mark.parametrize(("fields", "message"), [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be >= 1, got 0"),
    (dict(tensor_parallel_size=2, runner="transformers"), "tensor_parallel_size 2 needs runner 'paged'"),
])
def test_tp_config_refuses_what_it_cannot_run(fields: dict, message: str) -> None:
    from alise.worker.config import WorkerConfig

    with pytest.raises(ValueError, match=message):
        WorkerConfig(**fields)


def test_tp2_worker_profiles_its_steps_over_both_ranks(tmp_path) -> None:
    """``profile_latency`` at TP=2: both ranks run the profiler's grid in step (rank 1 as the
    worker's child would), and rank 0 keeps the fit, labelled with its rank count."""
    import json

    import torch.multiprocessing as mp

    from alise.core.latency_model import LatencyModel
    from tpkit import profiled_worker

    model_dir = str(make_tiny_model_dir(tmp_path / "model", "llama"))
    mp.spawn(profiled_worker, args=(model_dir, str(tmp_path / "out.json")), nprocs=1, join=True)
    result = json.loads((tmp_path / "out.json").read_text())
    profile = LatencyModel.from_json(result["profile"])
    assert result["num_blocks"] == 512
    assert profile.meta["tensor_parallel_size"] == 2 and profile.meta["num_samples"] >= 6
    assert profile.c0_s > 0
