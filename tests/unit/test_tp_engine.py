"""A tensor-parallel worker's engines (gloo, 2 processes): rank 0's driver engine, the other
rank following its messages, serves the same tokens with the same logits as one device's engine,
through chunked prefills beside decodes and each KV action on a paused job: swapped to host and
back, quantized to int8 and back, dropped and recomputed, quantized to int4 and back. The swapped
and dropped jobs resume with the logits of one device (float32: the all-reduces only reorder
sums); the quantized ones with those of one device quantizing the same KV (each rank encodes
its heads' groups of 32 channels, the groups one device encodes), within the rounding of a code
that the reordered sums may tip."""

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
    free = [r.num_free_device_blocks for r in reports]
    assert [r.num_free_device_blocks for r in tp2["reports"]] == free
    # Step 15 pauses a with int4: its 24 tokens' 6 blocks shrink to ceil(6 * 5/16) = 2, and
    # the step's decodes (b, c) take one block: 32 free before, 32 + 4 - 1 after.
    assert (free[14], free[15]) == (32, 35)
    outputs = [[(o.job_id, o.token_ids) for o in r.outputs] for r in reports]
    assert [[(o.job_id, o.token_ids) for o in r.outputs] for r in tp2["reports"]] == outputs
    assert sum(len(o) for o in outputs) > 40
    logprobs = [(o.job_id, lp) for r in reports for o in r.outputs for lp in o.logprobs or [None]]
    tp2_logprobs = [(o.job_id, lp) for r in tp2["reports"] for o in r.outputs for lp in o.logprobs or [None]]
    assert sum(1 for job_id, lp in logprobs if lp is not None) == sum(1 for job_id, _ in logprobs if job_id == "a")
    for (_, got), (_, want) in zip(tp2_logprobs, logprobs, strict=True):
        assert (got is None) == (want is None)
        if want is not None:  # within the all-reduces' reordering and a's quantized KV
            assert got.logprob == pytest.approx(want.logprob, abs=1e-2)
            assert got.top_logprobs == pytest.approx(want.top_logprobs, abs=1e-2)
    assert len(tp2["logits"]) == len(logits)
    # Job a's KV quantized to int8 (steps 7-9) and dequantized (step 10 on), to int4 (15-17).
    first_quantized = 7
    for step, (got, want) in enumerate(zip(tp2["logits"], logits, strict=True)):
        tol = (1e-3 if step >= first_quantized else 2e-5) * max(1.0, want.abs().max().item())
        err = (got - want).abs().max().item()
        assert err <= tol, f"step {step}: max |TP=2 - TP=1| = {err:.3g}"


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
