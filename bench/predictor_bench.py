"""Predictor speed on this machine: gRPC latency and index scale. Prints a table.

    .venv/bin/python bench/predictor_bench.py [--num-entries 1000000] [--bootstrap FILE ...]

1. Starts an in-process PredictorService bootstrapped from the AlpacaEval files (12 models),
   then measures one-prompt Predict latency (sequential calls) and a 256-prompt Predict.
2. Builds a VectorIndex of ``--num-entries`` synthetic unit vectors (dim 384), added in chunks
   the way Observe would (so it migrates flat -> IVF and retrains on the way), and reports
   build time, memory and search latency.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import resource
import statistics
import time

import numpy as np

DATA = sorted(glob.glob("/work/shared/data/alpaca_eval/*.jsonl.gz"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def grpc_latency(bootstrap: list[str], num_calls: int, num_threads: int) -> list[tuple[str, str]]:
    from alise.predictor.client import PredictorClient
    from alise.predictor.config import PredictorConfig
    from alise.predictor.datasets import load_records
    from alise.predictor.service import start_predictor_server

    started = time.perf_counter()
    server = await start_predictor_server(PredictorConfig(
        address="127.0.0.1:0", bootstrap=tuple(bootstrap), model="gpt4", num_threads=num_threads))
    startup_s = time.perf_counter() - started
    prompts = [r.prompt for r in load_records(bootstrap[0])]
    client = PredictorClient(f"127.0.0.1:{server.port}")
    rows = [("server start + bootstrap", f"{startup_s:.1f} s ({server.runtime.history.num_observations} obs)")]
    try:
        await client.predict(prompts[:4], timeout_s=30)  # warm-up
        single = []
        for i in range(num_calls):
            t = time.perf_counter()
            await client.predict([f"{prompts[i % len(prompts)]} (variant {i})"], timeout_s=30)
            single.append((time.perf_counter() - t) * 1000)
        batch = []
        for i in range(5):
            t = time.perf_counter()
            await client.predict([f"{p} ({i})" for p in prompts[:256]], timeout_s=60)
            batch.append(time.perf_counter() - t)
    finally:
        await client.close()
        await server.stop(0.5)
    single.sort()
    rows += [
        ("predict 1 prompt, median", f"{statistics.median(single):.1f} ms (goal <= 15 ms)"),
        ("predict 1 prompt, p90", f"{single[int(0.9 * len(single))]:.1f} ms"),
        ("predict 256 prompts, median of 5", f"{statistics.median(batch):.3f} s (goal <= 1 s)"),
    ]
    return rows


def index_scale(num_entries: int, chunk: int = 20_000) -> list[tuple[str, str]]:
    from alise.predictor.index import VectorIndex

    rng = np.random.default_rng(0)
    base_mb = rss_mb()
    index = VectorIndex(384)
    started = time.perf_counter()
    for start in range(0, num_entries, chunk):
        v = rng.standard_normal((min(chunk, num_entries - start), 384), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        index.add(v)
    build_s = time.perf_counter() - started
    queries = index.vectors[rng.choice(len(index), 200, replace=False)]
    t = time.perf_counter()
    for q in queries:
        index.search(q[None, :], 20)
    search_ms = (time.perf_counter() - t) / len(queries) * 1000
    t = time.perf_counter()
    index.search(queries[:200], 20)
    batch_ms = (time.perf_counter() - t) * 1000
    return [
        (f"index build, {num_entries:,} entries", f"{build_s:.1f} s ({index.index_type}, chunks of {chunk:,})"),
        ("index memory (RSS growth)", f"{rss_mb() - base_mb:.0f} MB (raw vectors {num_entries * 384 * 4 / 2**20:.0f} MB)"),
        ("search k=20, 1 query", f"{search_ms:.2f} ms"),
        ("search k=20, 200 queries", f"{batch_ms:.1f} ms"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-entries", type=int, default=1_000_000)
    parser.add_argument("--num-calls", type=int, default=100)
    parser.add_argument("--bootstrap", action="append", default=None)
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads of the encoder")
    args = parser.parse_args()
    print(f"{'measure':<34}  value")
    print("-" * 80)
    for rows in (asyncio.run(grpc_latency(args.bootstrap or DATA, args.num_calls, args.num_threads)),
                 index_scale(args.num_entries)):
        for name, value in rows:
            print(f"{name:<34}  {value}", flush=True)


if __name__ == "__main__":
    main()
