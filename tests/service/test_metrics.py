"""Prometheus metrics of the scheduler, scraped over HTTP after real traffic."""

from __future__ import annotations

import asyncio
import urllib.request

from cluster_fixtures import cluster


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_scheduler_metrics_after_traffic(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), metrics_address="127.0.0.1:0") as c, c.client() as client:
        await asyncio.gather(*(client.complete(f"m {i}", max_tokens=5, ignore_eos=True) for i in range(3)))
        m = await asyncio.to_thread(scrape, c.scheduler.metrics_port)
        num_blocks = c.workers[0][0].engine.allocator.num_blocks
    assert m['alise_requests_total{outcome="finished"}'] == 3
    assert m["alise_generated_tokens_total"] == 15
    assert m["alise_ttft_seconds_count"] == 3
    assert m["alise_tpot_seconds_count"] == 3
    assert m["alise_prediction_abs_error_tokens_count"] == 3
    assert m['alise_step_seconds_count{worker="w0"}'] >= 5
    assert m["alise_workers"] == 1
    assert m["alise_queue_waiting"] == 0
    total = m['alise_kv_blocks{state="free",where="device",worker="w0"}'] + \
        m['alise_kv_blocks{state="used",where="device",worker="w0"}']
    assert total == num_blocks


async def test_scheduler_serves_vllm_families_and_get_metrics_answers_them(tiny_llama_dir):
    from prometheus_client.parser import text_string_to_metric_families

    async with cluster(str(tiny_llama_dir), metrics_address="127.0.0.1:0") as c, c.client() as client:
        done = await asyncio.gather(*(client.complete(f"m {i}", max_tokens=5, ignore_eos=True) for i in range(3)))
        m = await asyncio.to_thread(scrape, c.scheduler.metrics_port)
        text, model = await client.metrics()
    assert m['vllm:request_success_total{finished_reason="length"}'] == 3
    assert m['vllm:request_success_total{finished_reason="stop"}'] == 0
    assert m["vllm:generation_tokens_total"] == 15
    assert m["vllm:prompt_tokens_total"] == sum(d.usage.prompt_tokens for d in done)
    assert m["vllm:time_to_first_token_seconds_count"] == 3
    assert m["vllm:inter_token_latency_seconds_count"] == 12  # 4 gaps in each of 3 streams
    assert m["vllm:request_time_per_output_token_seconds_count"] == 3
    assert m["vllm:e2e_request_latency_seconds_count"] == m["vllm:request_queue_time_seconds_count"] == 3
    assert m["vllm:request_generation_tokens_sum"] == 15
    assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_preemptions_total"] == 0
    assert m["alise_prediction_ratio_count"] == 3
    # GetMetrics answers the same families, for the HTTP door to serve.
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"vllm:request_success", "vllm:kv_cache_usage_perc", "alise_kv_blocks"} <= families
    assert model == str(tiny_llama_dir)


async def test_worker_metrics(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), worker_overrides={"metrics_address": "127.0.0.1:0"}) as c, \
            c.client() as client:
        await client.complete("worker metrics", max_tokens=4, ignore_eos=True)
        worker = c.workers[0][0]
        m = await asyncio.to_thread(scrape, worker.metrics_port)
    assert m["alise_worker_step_seconds_count"] >= 4
    assert m['alise_worker_tokens_total{kind="decode"}'] == 3
    assert m['alise_worker_tokens_total{kind="prefill"}'] >= 2
    assert m['alise_worker_kv_blocks{state="used"}'] == 0
    assert m["alise_worker_connected"] == 1


async def test_predictor_metrics(tmp_path):
    from alise.predictor.client import PredictorClient
    from alise.predictor.config import PredictorConfig
    from alise.predictor.service import start_predictor_server

    server = await start_predictor_server(PredictorConfig(address="127.0.0.1:0", metrics_address="127.0.0.1:0"))
    client = PredictorClient(f"127.0.0.1:{server.port}")
    try:
        await client.predict(["one prompt", "and another"], timeout_s=30)
        await client.observe("one prompt", 12)
        m = await asyncio.to_thread(scrape, server.metrics_port)
    finally:
        await client.close()
        await server.stop(0.1)
    assert m["alise_predictor_predict_seconds_count"] == 1
    assert m["alise_predictor_prompts_total"] == 2
    assert m['alise_predictor_observations_total{outcome="accepted"}'] == 1
    assert m["alise_predictor_history_prompts"] == 1
