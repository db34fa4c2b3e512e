#!/usr/bin/env python3
"""Decode steps of a tensor-parallel model against each rank's bandwidth floor.

    python3 bench/gpu/tp_decode.py --model llama-3-70b --dtype bfloat16 --tp 2 [--batches 1 64]
    python3 bench/gpu/tp_decode.py --model opt-13b --dtype float16 --tp 1 2
    python3 bench/gpu/tp_decode.py --device cpu --model tiny-llama --tp 1 2 --batches 1 8 --context 64

For each ``--tp`` size, that many processes (torch.multiprocessing spawn; NCCL on CUDA, gloo on
the CPU; rank r on cuda:r) load the preset's random weights in their slices
(alise.worker.model.tp_load) and build the worker's ModelRunner as it serves (kernel plan, CUDA
graphs on CUDA). Every rank fills its KV pages with random values and times, in step with the
others, a decode step of each batch at ``--context`` tokens a sequence: median wall time of
``execute`` (forward, LM head, logits gathered) over ``--reps`` steps. Also measured on each
rank: the copy bandwidth of its device (a 1 GiB device-to-device copy, read + write) and the
time of one all-reduce of a decode step's ``[batch, hidden]`` activations.

The floor of a step on one rank is what it must move and wait for: its weight bytes and the KV
bytes the step reads, over the measured bandwidth, plus the step's ``2 * layers + 1``
all-reduces (one after each attention and each MLP block, one for the vocabulary-parallel
embedding). ``floor/step`` says how close the step comes to it. Rows print as they are made;
``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

BLOCK_SIZE = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):  # the first calls of a shape allocate and pick kernels
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    num_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / median_s(lambda: dst.copy_(src), device, 10)


def allreduce_s(tp, batch: int, hidden: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    if tp is None:
        return 0.0
    x = torch.randn(batch, hidden, dtype=dtype, device=device)
    return median_s(lambda: tp.all_reduce(x), device, reps)


def build(args, rank: int, world_size: int, store: str):
    from alise.worker.model.loader import load_model
    from alise.worker.model.parallel import init_tensor_parallel, rank_device
    from alise.worker.model.runner import ModelRunner

    device = rank_device(args.device, rank)
    tp = init_tensor_parallel(rank, world_size, store, device, 0) if world_size > 1 else None
    loaded = load_model(args.model, device=device, dtype=args.dtype, max_model_len=args.context + 16, tp=tp)
    per_seq = -(-(args.context + 1) // BLOCK_SIZE)
    runner = ModelRunner(loaded, num_blocks=max(args.batches) * per_seq, block_size=BLOCK_SIZE,
                         max_num_seqs=max(args.batches), max_num_tokens=0)
    runner.kv_cache.fill_random_()
    return loaded, runner, per_seq


def rank_main(rank: int, world_size: int, store: str, args, out: str) -> None:
    from alise.worker.model.chunk import SeqChunk

    loaded, runner, per_seq = build(args, rank, world_size, store)
    device = loaded.device
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in loaded.model.parameters()}.values())
    kv = runner.kv_cache
    kv_bytes_per_token = kv.num_bytes // (kv.num_blocks * kv.block_size)
    bandwidth = copy_bandwidth(device)
    rows = []
    for batch in args.batches:
        chunks = [SeqChunk([100 + b], args.context, list(range(b * per_seq, (b + 1) * per_seq)))
                  for b in range(batch)]
        step_s = median_s(lambda c=chunks: runner.execute(c).argmax(-1).tolist(), device, args.reps)
        ar_s = allreduce_s(loaded.tp, batch, loaded.config.hidden_size, loaded.dtype, device, args.reps)
        moved = weight_bytes + kv_bytes_per_token * batch * args.context
        floor_s = moved / bandwidth + (2 * runner.spec.num_layers + 1) * ar_s
        rows.append(dict(model=args.model, tp=world_size, batch=batch, context=args.context, step_ms=step_s * 1e3,
                         floor_ms=floor_s * 1e3, allreduce_us=ar_s * 1e6, weight_gb=weight_bytes / 1e9,
                         bandwidth_tb_s=bandwidth / 1e12, floor_over_step=floor_s / step_s))
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(rows, f)


def run_tp(args, world_size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(rank_main, args=(world_size, os.path.join(tmp, "store"), args, out), nprocs=world_size, join=True)
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3-70b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cuda (rank r on cuda:r) or cpu")
    parser.add_argument("--tp", type=int, nargs="+", default=[2], help="tensor-parallel sizes to run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.device.startswith("cuda") and torch.cuda.device_count() < max(args.tp):
        print(f"--tp {max(args.tp)} needs {max(args.tp)} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"decode steps, {args.model} ({args.dtype}, random weights), context {args.context}, {device_name}")
    print(f"{'tp':>3} {'batch':>5} {'step ms':>8} {'floor ms':>8} {'floor/step':>10} {'allreduce us':>12} "
          f"{'GB/rank':>7} {'TB/s':>6}")
    rows = []
    for world_size in args.tp:
        for r in run_tp(args, world_size):
            rows.append(r)
            print(f"{r['tp']:>3} {r['batch']:>5} {r['step_ms']:>8.2f} {r['floor_ms']:>8.2f} "
                  f"{r['floor_over_step']:>10.2f} {r['allreduce_us']:>12.1f} {r['weight_gb']:>7.2f} "
                  f"{r['bandwidth_tb_s']:>6.2f}", flush=True)
    if len(args.tp) > 1:
        base = {r["batch"]: r["step_ms"] for r in rows if r["tp"] == args.tp[0]}
        for r in rows:
            if r["tp"] != args.tp[0]:
                print(f"tp {r['tp']} vs tp {args.tp[0]}, batch {r['batch']}: {base[r['batch']] / r['step_ms']:.2f}x")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(dict(device=device_name, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
