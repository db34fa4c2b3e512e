"""What the scheduler is set up with: the worker's latency profile (sent in its hello), the KV planner."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from cluster_fixtures import cluster

from alise.core.config import SchedulingConfig
from alise.core.latency_model import LatencyModel
from alise.v1 import worker_pb2, worker_pb2_grpc

PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "tiny-llama-cpu.json"


async def test_scheduler_adopts_the_workers_profile(tiny_llama_dir):
    expected = LatencyModel.load(str(PROFILE))
    async with cluster(str(tiny_llama_dir), scheduling=SchedulingConfig(policy="alise"),
                       worker_overrides=dict(latency_profile=str(PROFILE))) as c, \
            c.client() as client:
        latency = c.scheduler.engine.latency
        assert latency.name == expected.name != "default"
        assert (latency.c0_s, latency.c_pre_s) == (expected.c0_s, expected.c_pre_s)
        # The policy and the core's remaining-time estimates price jobs with the same object.
        core = c.scheduler.engine.core
        policy = core.policy
        assert policy.latency is latency and core.estimator.latency is latency
        assert policy.switch_cost_s == pytest.approx(4 * expected.step_s(1, 0))
        result = await client.complete("priced by the worker's profile", max_tokens=4, ignore_eos=True)
        assert len(result.token_ids) == 4


async def test_bad_profile_in_hello_is_refused(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), num_workers=0) as c:
        hello = worker_pb2.WorkerHello(
            worker_id="bad-profile", model="m", device="cpu", block_size=16,
            num_device_blocks=8, max_model_len=64, vocab_size=c.scheduler.servicer.info.vocab_size,
            block_bytes=1024, max_num_seqs=4, max_num_batched_tokens=64,
            latency_profile_json=json.dumps({"c0_s": -1.0}))
        async with grpc.aio.insecure_channel(c.worker_address) as channel:
            call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
            await call.write(worker_pb2.WorkerMessage(hello=hello))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "latency profile" in err.value.details() and "c0_s" in err.value.details()
        assert "bad-profile" not in c.scheduler.engine.links


def test_kv_planner_choice_is_validated():
    with pytest.raises(ValueError, match="kv_planner must be one of"):
        SchedulingConfig(kv_planner="teleport")
    assert SchedulingConfig(kv_planner="drop").kv_planner == "drop"


async def test_alise_with_drop_planner_serves(tiny_llama_dir):
    from alise.core.memory_planner import DropPlanner

    drop = SchedulingConfig(policy="alise", kv_planner="drop")
    async with cluster(str(tiny_llama_dir), scheduling=drop) as c, c.client() as client:
        assert isinstance(c.scheduler.engine.core.planner.memory, DropPlanner)
        result = await client.complete("drop only", max_tokens=3, ignore_eos=True)
        assert len(result.token_ids) == 3


async def test_step_log_records_each_model_step_as_a_fit_sample(tiny_llama_dir, tmp_path):
    log = tmp_path / "steps.jsonl"
    async with cluster(str(tiny_llama_dir), scheduling=SchedulingConfig(policy="fcfs"),
                       worker_overrides=dict(step_log=str(log))) as c, \
            c.client() as client:
        await client.complete("one two three four five six", max_tokens=4, ignore_eos=True)
        steps = c.workers[0][0].engine.last_step_shape
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 4  # the prompt's prefill (first token), then three decodes
    first, *decodes = rows
    assert first["num_seqs"] == 1 and len(first["prefill_lens"]) == 1 and first["prefill_lens"][0] > 1
    prompt = first["prefill_lens"][0]
    assert first["context"] == prompt
    assert [(r["num_seqs"], r["context"], r["prefill_lens"]) for r in decodes] == \
        [(1, prompt + k, []) for k in (1, 2, 3)]
    assert steps == (1, prompt + 3, [], [])
    assert first["prefill_starts"] == [0]
    assert all(r["seconds"] > 0 for r in rows) and len({r["step"] for r in rows}) == 4
    fitted = LatencyModel.fit([(r["num_seqs"], r["context"], r["prefill_lens"], r["seconds"]) for r in rows])
    assert fitted.step_s(1, prompt + 1) > 0


async def test_job_log_records_each_finished_job_with_its_estimate(tiny_llama_dir, tmp_path):
    log = tmp_path / "jobs.jsonl"
    alise = SchedulingConfig(policy="alise")
    async with cluster(str(tiny_llama_dir), scheduling=alise, job_log=str(log)) as c, c.client() as client:
        for n in (3, 5):
            await client.complete(f"a prompt for {n} tokens", max_tokens=n, ignore_eos=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["output_tokens"] for r in rows] == [3, 5]
    for r in rows:
        assert r["prompt_tokens"] > 0 and r["preemptions"] == 0
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        # No predictor configured: the running mean, and the log says so.
        assert r["estimate"]["source"] == "mean" and r["estimate"]["p90"] >= r["estimate"]["mean"] > 0
    assert rows[0]["job_id"] != rows[1]["job_id"]
