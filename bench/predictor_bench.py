"""Predictor speed on this machine: gRPC latency and index scale. Prints a table.

    .venv/bin/python bench/predictor_bench.py [--num-entries 1000000] [--bootstrap FILE ...]

1. Bare encoder: its start with an empty cache (export and quantization) and a warm one; the
   cosine, on 256 prompts, of the encoder at the model's full depth (fp32 and int8) to
   sentence-transformers' own vectors, and of the default int8 encoder to the same depth in
   fp32; then, in the same run so the ratios hold on a loaded machine, sentence-transformers'
   own encode (torch, padded batches) and the encoder (the default depth in fp32 and int8,
   the full depth in int8), 1 prompt and 256 prompts, wall and CPU seconds, with the load
   average beside each line.
2. Starts an in-process PredictorService bootstrapped from the AlpacaEval files (12 models),
   with an index dir (so the write-ahead log is on), then measures one-prompt Predict latency
   (sequential calls), a 256-prompt Predict, and 256 observations naming those predictions
   on one Observe stream (until the last is durable: in the history and fsync'd).
3. Builds a VectorIndex of ``--num-entries`` synthetic unit vectors (dim 384), added in chunks
   the way Observe would (so it migrates flat -> IVF and retrains on the way), and reports
   build time, memory and search latency.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import os
import resource
import shutil
import statistics
import tempfile
import time
from functools import partial

import numpy as np

DATA = sorted(glob.glob("/work/shared/data/alpaca_eval/*.jsonl.gz"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` over ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def bare_encoder(bootstrap: list[str], num_calls: int, num_threads: int) -> list[tuple[str, str]]:
    import torch
    from sentence_transformers import SentenceTransformer

    from alise.predictor.datasets import load_records
    from alise.predictor.encoder import Encoder
    from alise.predictor.tokens import default_model_path

    prompts = list(dict.fromkeys(r.prompt for r in load_records(bootstrap[0])))
    model = SentenceTransformer(default_model_path(), device="cpu", local_files_only=True)
    torch.set_num_threads(num_threads)

    def original(batch):  # sentence-transformers' own padded batches, torch's intra-op threads
        model.encode(batch, batch_size=64, normalize_embeddings=True, show_progress_bar=False)

    rows = []
    with tempfile.TemporaryDirectory() as cold:  # a machine's first start: export and quantize
        os.environ["ALISE_CACHE_DIR"], before = cold, os.environ.get("ALISE_CACHE_DIR")
        try:
            started = time.perf_counter()
            Encoder(num_threads=num_threads)
            rows.append(("encoder start, empty cache (export + quantize)", f"{time.perf_counter() - started:.1f} s"))
        finally:
            if before is None:
                del os.environ["ALISE_CACHE_DIR"]
            else:
                os.environ["ALISE_CACHE_DIR"] = before
    started = time.perf_counter()
    pair = (Encoder(num_threads=num_threads, int8=False), Encoder(num_threads=num_threads))
    rows.append(("encoder start, cached (both)", f"{time.perf_counter() - started:.1f} s"))
    full = (Encoder(num_threads=num_threads, int8=False, layers=pair[0].depth),
            Encoder(num_threads=num_threads, layers=pair[0].depth))  # sentence-transformers' vectors
    sample = prompts[:256]
    want = model.encode([p[:pair[0].max_chars] for p in sample], batch_size=64, normalize_embeddings=True,
                        show_progress_bar=False)
    for enc, ref, ref_name in ((full[0], want, "sentence-transformers"), (full[1], want, "sentence-transformers"),
                               (pair[1], pair[0].encode(sample).vectors, pair[0].name)):
        cosine = (enc.encode(sample).vectors * ref).sum(axis=1)
        rows.append((f"encoder {enc.name} vs {ref_name}, cosine",
                     f"mean {cosine.mean():.5f}, worst {cosine.min():.5f} ({len(sample)} prompts)"))
    encoders = [("sentence-transformers (torch, fp32)", original)]
    encoders += [(f"encoder {enc.name}", enc.encode) for enc in (*pair, full[1])]
    for rep in range(2):  # interleaved, so all see the same load
        for name, encode in encoders:
            encode(prompts[:8])
            singles = itertools.cycle(prompts)
            one = timed(lambda encode=encode, singles=singles: encode([next(singles)]), num_calls)
            many = timed(partial(encode, prompts[256 * rep:256 * (rep + 1)]), 3)
            rows.append((f"{name}, 1 prompt",
                         f"{one[0] * 1000:.1f} ms wall, {one[1] * 1000:.1f} ms CPU ({load()})"))
            rows.append((f"{name}, 256 prompts",
                         f"{many[0]:.2f} s wall, {many[1]:.2f} s CPU ({load()})"))
    return rows


async def grpc_latency(bootstrap: list[str], num_calls: int, num_threads: int) -> list[tuple[str, str]]:
    from alise.predictor.client import PredictorClient
    from alise.predictor.config import PredictorConfig
    from alise.predictor.datasets import load_records
    from alise.predictor.service import start_predictor_server
    from alise.v1 import predictor_pb2

    started = time.perf_counter()
    index_dir = tempfile.mkdtemp(prefix="predictor-bench-")
    server = await start_predictor_server(PredictorConfig(
        address="127.0.0.1:0", bootstrap=tuple(bootstrap), model="gpt4", num_threads=num_threads,
        index_dir=index_dir))
    startup_s = time.perf_counter() - started
    prompts = [r.prompt for r in load_records(bootstrap[0])]
    client = PredictorClient(f"127.0.0.1:{server.port}")
    rows = [("server start + bootstrap", f"{startup_s:.1f} s ({server.runtime.history.num_observations} obs, "
             f"encoder {server.runtime.encoder.name}, {num_threads} thread(s))")]
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
            estimates = await client.predict([f"{p} ({i})" for p in prompts[:256]], timeout_s=60)
            batch.append(time.perf_counter() - t)
        messages = [predictor_pb2.Observation(prediction_id=e.prediction_id, output_tokens=100 + k,
                                              sequence=k + 1, sender="bench")
                    for k, e in enumerate(estimates)]
        t = time.perf_counter()
        call = client.observe_stream(timeout_s=60)
        for m in messages:
            await call.write(m)
        await call.done_writing()
        replies = [r async for r in call]
        observe_s = time.perf_counter() - t
    finally:
        await client.close()
        await server.stop(0.5)
        shutil.rmtree(index_dir, ignore_errors=True)
    single.sort()
    rows += [
        ("predict 1 prompt, median", f"{statistics.median(single):.1f} ms (goal <= 15 ms; {load()})"),
        ("predict 1 prompt, p90", f"{single[int(0.9 * len(single))]:.1f} ms"),
        ("predict 256 prompts, median of 5", f"{statistics.median(batch):.3f} s (goal <= 1 s; {load()})"),
        ("observe 256 by prediction id, 1 stream", f"{observe_s * 1000:.0f} ms to the last durable answer "
         f"({replies[-1].num_accepted} accepted, {len(replies)} answers; {load()})"),
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
        ("index memory (RSS growth)",
         f"{rss_mb() - base_mb:.0f} MB (raw vectors {num_entries * 384 * 4 / 2**20:.0f} MB)"),
        ("search k=20, 1 query", f"{search_ms:.2f} ms"),
        ("search k=20, 200 queries", f"{batch_ms:.1f} ms"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-entries", type=int, default=1_000_000)
    parser.add_argument("--num-calls", type=int, default=100)
    parser.add_argument("--bootstrap", action="append", default=None)
    parser.add_argument("--num-threads", type=int, action="append", default=None,
                        help="encoder threads (repeatable: each is measured; default 1 and 2)")
    parser.add_argument("--skip-index", action="store_true", help="leave out the index scale part")
    args = parser.parse_args()
    data = args.bootstrap or DATA
    print(f"{'measure':<40}  value")
    print("-" * 96)
    for num_threads in args.num_threads or [1, 2]:
        print(f"-- {num_threads} encoder thread(s)")
        for rows in (bare_encoder(data, args.num_calls, num_threads),
                     asyncio.run(grpc_latency(data, args.num_calls, num_threads))):
            for name, value in rows:
                print(f"{name:<40}  {value}", flush=True)
    if not args.skip_index:
        for name, value in index_scale(args.num_entries):
            print(f"{name:<40}  {value}", flush=True)


if __name__ == "__main__":
    main()
