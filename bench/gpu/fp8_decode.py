#!/usr/bin/env python3
"""Decode attention over fp16 vs fp8 KV pages, OPT-13B shapes, at batch 1 and 64 (one call).

    python3 bench/gpu/fp8_decode.py [--contexts 512 1024] [--engine] [--out $OUT/fp8_decode.json]

For each batch size and context, the pages of all 40 layers (40 heads x 128 channels, blocks of
16) are filled with random values and a decode step's attention (the Triton decode kernel the
worker runs, with the split-K count it would choose) is graph-timed layer after layer, in fp16
pages and in fp8 pages (``kv_cache_dtype="fp8_e4m3"``). Also printed: the KV bytes a step reads
over that time (the achieved bandwidth) and the fp8 output's relative error against the fp16
pages' output.

With ``--engine``, also whole decode steps of the OPT-13B preset (random fp16 weights) through
the worker's ModelRunner as it serves (kernel plan, decode CUDA graphs), once with fp16 pages
and once with fp8 pages, batch 1 and 64 at context 512: the median wall time of ``execute``
over 30 steps. Tables come last.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from alise.worker.kernels import triton_attention
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kv_cache import to_pages
from alise.worker.model.timing import graph_time_s, median_wall_s

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE = 40, 40, 128, 16


def step_case(batch: int, context: int, dtype: torch.dtype) -> dict:
    """Pages of every layer for ``batch`` sequences of ``context`` tokens, shuffled block ids."""
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq
    tables = torch.randperm(num_blocks, device="cuda").view(batch, per_seq)
    shape = (LAYERS, num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)
    keys = torch.empty(shape, dtype=dtype, device="cuda")
    values = torch.empty(shape, dtype=dtype, device="cuda")
    for layer in range(LAYERS):
        keys[layer] = to_pages(torch.randn(shape[1:], device="cuda", dtype=torch.float16), dtype)
        values[layer] = to_pages(torch.randn(shape[1:], device="cuda", dtype=torch.float16), dtype)
    return dict(keys=keys, values=values, tables=tables,
                lens=torch.full((batch,), context, device="cuda", dtype=torch.int64))


def time_step(case: dict, query: torch.Tensor, out: torch.Tensor) -> float:
    """Seconds of one decode step's attention over all layers."""

    def step() -> None:
        for layer in range(LAYERS):
            triton_attention.decode_attention(query, case["keys"][layer], case["values"][layer], case["tables"],
                                              case["lens"], HEAD_DIM ** -0.5, out=out[layer], fused_merge=True)

    return graph_time_s(step, calls=2, reps=5)  # already per call


def engine_steps(batches: list[int], context: int) -> list[dict]:
    """Median seconds of a decode step of the OPT-13B preset at each batch, fp16 vs fp8 pages."""
    from alise.worker.model.loader import load_model
    from alise.worker.model.runner import ModelRunner

    loaded = load_model("opt-13b", device="cuda", dtype="float16", max_model_len=2048)
    per_seq = -(-(context + 1) // BLOCK_SIZE)
    times = {}
    for kv in ("auto", "fp8_e4m3"):
        runner = ModelRunner(loaded, num_blocks=max(batches) * per_seq, block_size=BLOCK_SIZE,
                             max_num_seqs=max(batches), max_num_tokens=0, kv_cache_dtype=kv)
        runner.kv_cache.fill_random_()
        for batch in batches:
            chunks = [SeqChunk([100 + b], context, list(range(b * per_seq, (b + 1) * per_seq))) for b in range(batch)]
            times[kv, batch] = median_wall_s(lambda c=chunks, r=runner: r.execute(c).argmax(-1).tolist(), reps=30)
        del runner
        torch.cuda.empty_cache()
    return [dict(batch=b, context=context, fp16_ms=times["auto", b] * 1e3, fp8_ms=times["fp8_e4m3", b] * 1e3,
                 speedup=times["auto", b] / times["fp8_e4m3", b]) for b in batches]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--engine", action="store_true", help="also time whole decode steps of opt-13b")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if not triton_attention.is_available():
        print("needs CUDA and Triton", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            query = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
            times, outs = {}, {}
            for name, dtype in (("fp16", torch.float16), ("fp8", torch.float8_e4m3fn)):
                torch.manual_seed(1)  # the same values, stored in each dtype
                case = step_case(batch, context, dtype)
                outs[name] = torch.empty(LAYERS, batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
                times[name] = time_step(case, query, outs[name])
                kv_bytes = 2 * LAYERS * batch * context * HEADS * HEAD_DIM * case["keys"].element_size()
                times[name + "_tb_s"] = kv_bytes / times[name] / 1e12
                del case
                torch.cuda.empty_cache()
            err = ((outs["fp8"].float() - outs["fp16"].float()).norm() / outs["fp16"].float().norm()).item()
            rows.append(dict(batch=batch, context=context, fp16_ms=times["fp16"] * 1e3, fp8_ms=times["fp8"] * 1e3,
                             fp16_tb_s=times["fp16_tb_s"], fp8_tb_s=times["fp8_tb_s"],
                             speedup=times["fp16"] / times["fp8"], fp8_rel_err=err))
    steps = engine_steps(args.batches, 512) if args.engine else []
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM,
                           block_size=BLOCK_SIZE, rows=rows, engine_steps=steps), f, indent=1)
    print(f"decode attention, {LAYERS} layers of OPT-13B heads, {torch.cuda.get_device_name()}")
    print(f"{'batch':>5} {'context':>7} {'fp16 ms':>8} {'fp8 ms':>8} {'fp16 TB/s':>9} {'fp8 TB/s':>8} "
          f"{'fp16/fp8':>8} {'fp8 err':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['context']:>7} {r['fp16_ms']:>8.3f} {r['fp8_ms']:>8.3f} {r['fp16_tb_s']:>9.2f} "
              f"{r['fp8_tb_s']:>8.2f} {r['speedup']:>8.2f} {r['fp8_rel_err']:>8.1e}")
    if steps:
        print("whole decode step, opt-13b preset (ModelRunner.execute, decode graphs), median of 30")
        print(f"{'batch':>5} {'context':>7} {'fp16 ms':>8} {'fp8 ms':>8} {'fp16/fp8':>8}")
        for r in steps:
            print(f"{r['batch']:>5} {r['context']:>7} {r['fp16_ms']:>8.2f} {r['fp8_ms']:>8.2f} {r['speedup']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
