"""Where a mixed step's time goes: decode rows beside prefill chunks, OPT-13B shapes on a GPU.

    python3 bench/gpu/mixed_steps.py [--model opt-13b] [--batch 58]

A serving run showed steps that carry prefill tokens costing several times a pure decode step.
This times, with the worker's own runner and sampler (greedy), a decode batch at one context
alone (graph replay, and eager) and beside prefill chunks of the kinds serving produces (a fresh
prompt, a recompute after a drop, a continuing chunk, several prompts), then profiles one mixed
step (top CUDA and CPU ops). Prints tables; torch and the repository only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alise.core.sampling import SamplingParams
from alise.worker.model.attention import MIN_BATCHED_FRESH
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kv_cache import KVCache
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from alise.worker.model.sampler import Sampler

BLOCK_SIZE = 16


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn, reps: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--batch", type=int, default=58)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--kv-gib", type=float, default=30.0)
    parser.add_argument("--profile", action="store_true", help="also profile one mixed step")
    parser.add_argument("--skip-cudnn", action="store_true", help="skip the cuDNN SDPA on/off comparison")
    args = parser.parse_args()
    parser_device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model, device=parser_device, dtype="float16" if parser_device == "cuda" else "float32")
    num_blocks = KVCache.num_blocks_for_budget(loaded.config, BLOCK_SIZE, loaded.dtype, int(args.kv_gib * 2**30))
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=64)
    runner.kv_cache.key_cache.normal_()
    runner.kv_cache.value_cache.normal_()
    sampler = Sampler()
    vocab = runner.vocab_size
    next_block = [0]

    def table(n_tokens: int) -> list[int]:
        first, count = next_block[0], -(-n_tokens // BLOCK_SIZE)
        next_block[0] += count
        if next_block[0] > num_blocks:
            raise SystemExit(f"--kv-gib too small: {num_blocks} blocks")
        return list(range(first, first + count))

    decodes = [SeqChunk([(13 * i + 1) % vocab], args.context, table(args.context + 1))
               for i in range(args.batch)]

    def prefill(n: int, start: int = 0) -> SeqChunk:
        return SeqChunk([(7 * i + 3) % vocab for i in range(n)], start, table(start + n))

    cases = {
        "decode only (graph)": decodes,
        "decode only (eager)": None,
        "+ fresh prompt 75": decodes + [prefill(75)],
        "+ recompute 300": decodes + [prefill(300)],
        "+ recompute 800": decodes + [prefill(800)],
        "+ chunk 75 at 200": decodes + [prefill(75, 200)],
        "+ 4 prompts of 50, batched": decodes + [prefill(50) for _ in range(4)],
        "+ 4 prompts of 50, one attention call each": decodes + [prefill(50) for _ in range(4)],
        "+ 8 prompts of 32, batched": decodes + [prefill(32) for _ in range(8)],
        "+ 8 prompts of 32, one attention call each": decodes + [prefill(32) for _ in range(8)],
        "prompt 75 alone": [prefill(75)],
        "recompute 300 alone": [prefill(300)],
    }

    def step(chunks):
        params = [SamplingParams(temperature=0.0)] * len(chunks)
        return sampler.sample(runner.execute(chunks), params, [None] * len(chunks))

    rows = []
    # Serving sees a new prompt length nearly every step: one new length per call here.
    lengths = iter(range(60, 100000))

    def varying(kind: str):
        n = next(lengths)
        return decodes + ([prefill(n)] if kind == "fresh" else [prefill(n, 200)])

    for cudnn in (() if args.skip_cudnn else (True, False)):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for kind in ("fresh", "chunk"):
            name = f"+ {kind} 60-80, new length each call, cuDNN SDPA {'on' if cudnn else 'off'}"
            rows.append((name, wall_ms(lambda k=kind: step(varying(k)), reps=9)))
            print(f"{name:60s} {rows[-1][1]:8.2f} ms", flush=True)
    torch.backends.cuda.enable_cudnn_sdp(False)  # the runner's setting
    for name, chunks in cases.items():
        if chunks is None:
            saved, runner.decode_graphs = runner.decode_graphs, None
            rows.append((name, wall_ms(lambda: step(decodes))))
            runner.decode_graphs = saved
        else:
            # Several fresh prompts: batched into one attention call (the default on CUDA),
            # or one call each.
            batched = "prompts of" in name and "one attention call each" not in name
            default, runner.min_batched_fresh = runner.min_batched_fresh, MIN_BATCHED_FRESH if batched else 0
            rows.append((name, wall_ms(lambda c=chunks: step(c))))
            runner.min_batched_fresh = default
        print(f"{name:60s} {rows[-1][1]:8.2f} ms", flush=True)

    if args.profile:
        mixed = cases["+ fresh prompt 75"]
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(mixed)
            sync()
        averages = prof.key_averages()
        print(averages.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        print(averages.table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))

    print(f"\n{args.model}, fp16, {args.batch} decode rows at context {args.context}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; "
          "forward + greedy sampling, median wall ms")
    for name, ms in rows:
        print(f"  {name:60s} {ms:8.2f}")


if __name__ == "__main__":
    main()
