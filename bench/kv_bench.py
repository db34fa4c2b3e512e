"""KV offload on a GPU: swap bandwidth against a plain pinned copy, quantize/dequantize timings.

    python3 bench/kv_bench.py [--gib 1] [--out results.json]

Llama-7B KV geometry (32 layers, 32 KV heads x 128, 16-token blocks, fp16: 8 MiB a block).
A job of ``--gib`` GiB of KV sits in scattered blocks of the device cache; the script times

* the plain copy: one contiguous device tensor of the same size to/from pinned host memory;
* swap-out / swap-in of the job through the worker's KV manager and ``TorchKvMover`` (side
  stream, staging, event);
* the overlap of a swap with compute on the default stream;
* quantize (int8, int4) in place and dequantize on resume, with the reconstruction error, on
  the fused Triton kernels (the default on CUDA) and on the torch codec.

Torch only (no grpc, no faiss). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from alise.core.commands import KvAction
from alise.core.job import KvPlace
from alise.worker.kv_manager import KvManager, KvState
from alise.worker.model.kv_cache import KVCache, KVShape
from alise.worker.model.kv_offload import TorchKvMover

SHAPE = KVShape(num_layers=32, num_kv_heads=32, head_dim=128)
BLOCK_SIZE = 16


def timed(fn, reps: int = 5) -> float:
    """Median wall seconds of ``fn`` (synchronized before and after), after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda")
    block_bytes = 2 * SHAPE.num_layers * BLOCK_SIZE * SHAPE.num_kv_heads * SHAPE.head_dim * 2
    num_job = int(args.gib * (1 << 30) // block_bytes)
    cache = KVCache(SHAPE, num_blocks=3 * num_job, block_size=BLOCK_SIZE, dtype=torch.float16,
                    device=device)
    cache.key_cache.normal_()
    cache.value_cache.normal_()
    mover = TorchKvMover(cache, num_host_blocks=num_job)
    offload = KvManager(cache.num_blocks, num_job, BLOCK_SIZE, mover)
    allocator = offload.allocator
    gen = torch.Generator().manual_seed(0)
    scattered = torch.randperm(cache.num_blocks, generator=gen)[:num_job].tolist()
    allocator._free = [b for b in allocator._free if b not in set(scattered)]
    allocator._allocated.update(scattered)
    seq = KvState(place=KvPlace.DEVICE, block_table=list(scattered),
                  num_cached=num_job * BLOCK_SIZE)
    num_bytes = num_job * block_bytes
    results: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                         num_bytes=num_bytes, block_bytes=block_bytes, num_blocks=num_job)

    # Plain pinned copies of the same bytes, contiguous.
    dev = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    results["plain_d2h_s"] = timed(lambda: host.copy_(dev, non_blocking=True))
    results["plain_h2d_s"] = timed(lambda: dev.copy_(host, non_blocking=True))
    dev = host = None  # free before the swaps

    # Swap-out then swap-in of the scattered job, timed separately (each waits for its event).
    snapshot = torch.stack((cache.key_cache[:, scattered], cache.value_cache[:, scattered])).clone()
    outs, ins = [], []
    for _ in range(4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        assert offload.pause(seq, KvAction.SWAP_TO_HOST) is None
        mover.synchronize()
        offload.reclaim()
        outs.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert offload.resume(seq) is None
        offload.wait_ready([seq])
        torch.cuda.synchronize()
        ins.append(time.perf_counter() - start)
    index = torch.tensor(seq.block_table, device=device)
    exact = torch.equal(torch.stack((cache.key_cache[:, index], cache.value_cache[:, index])), snapshot)
    results.update(swap_out_s=statistics.median(outs[1:]), swap_in_s=statistics.median(ins[1:]),
                   swap_round_trip_exact=exact)
    del snapshot

    # Overlap: a swap-out + swap-in issued while the default stream multiplies matrices.
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

    def compute():
        for _ in range(20):
            a @ a

    def swap():
        offload.pause(seq, KvAction.SWAP_TO_HOST)
        offload.resume(seq)
        offload.wait_ready([seq])

    def both():
        swap_thread_free = offload.pause(seq, KvAction.SWAP_TO_HOST)
        assert swap_thread_free is None
        compute()
        offload.resume(seq)
        offload.wait_ready([seq])

    t_compute, t_swap, t_both = timed(compute, 3), timed(swap, 3), timed(both, 3)
    results.update(overlap_compute_s=t_compute, overlap_swap_s=t_swap, overlap_both_s=t_both)
    a = None

    # Quantize in place and dequantize on resume, per format, fused kernels then the torch codec.
    paths = (("fused", True), ("torch", False)) if mover.fused else (("torch", False),)
    for (path, fused), (bits, action) in ((p, b) for p in paths
                                          for b in ((8, KvAction.QUANTIZE_INT8),
                                                    (4, KvAction.QUANTIZE_INT4))):
        mover.fused = fused
        reference = torch.stack((cache.key_cache[:, seq.block_table],
                                 cache.value_cache[:, seq.block_table])).float()
        q_times, d_times = [], []
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            assert offload.pause(seq, action) is None
            torch.cuda.synchronize()
            q_times.append(time.perf_counter() - start)
            held = len(seq.block_table)
            start = time.perf_counter()
            assert offload.resume(seq) is None
            torch.cuda.synchronize()
            d_times.append(time.perf_counter() - start)
            if len(q_times) == 1:
                restored = torch.stack((cache.key_cache[:, seq.block_table],
                                        cache.value_cache[:, seq.block_table])).float()
                rel = ((restored - reference).norm() / reference.norm()).item()
                del restored
            # Put the exact values back so each repetition starts from the same data.
            cache.key_cache[:, seq.block_table] = reference[0].half()
            cache.value_cache[:, seq.block_table] = reference[1].half()
        results[f"int{bits}_{path}"] = dict(quantize_s=statistics.median(q_times[1:]),
                                            dequantize_s=statistics.median(d_times[1:]),
                                            blocks_held=held, rel_error=rel)
        del reference

    gib = num_bytes / (1 << 30)
    gbs = lambda s: num_bytes / s / 1e9  # noqa: E731
    print(f"device {results['device']}, torch {results['torch']}, job {gib:.2f} GiB "
          f"({num_job} blocks of {block_bytes >> 20} MiB, scattered)")
    print(f"{'copy':28s} {'ms':>8s} {'GB/s':>7s} {'vs plain':>8s}")
    for name, key, plain in (("plain pinned D2H", "plain_d2h_s", "plain_d2h_s"),
                             ("swap-out (KV manager)", "swap_out_s", "plain_d2h_s"),
                             ("plain pinned H2D", "plain_h2d_s", "plain_h2d_s"),
                             ("swap-in (KV manager)", "swap_in_s", "plain_h2d_s")):
        s = results[key]
        print(f"{name:28s} {s * 1e3:8.2f} {gbs(s):7.1f} {results[plain] / s:8.1%}")
    print(f"swap round trip exact: {results['swap_round_trip_exact']}")
    print(f"overlap: compute {t_compute * 1e3:.1f} ms, swap out+in {t_swap * 1e3:.1f} ms, "
          f"both {t_both * 1e3:.1f} ms (hidden: {(t_compute + t_swap - t_both) / t_swap:.0%} of the swap)")
    for path, _ in paths:
        for bits in (8, 4):
            r = results[f"int{bits}_{path}"]
            print(f"int{bits} {path:5s}: quantize {r['quantize_s'] * 1e3:7.2f} ms "
                  f"({gbs(r['quantize_s']):6.1f} GB/s), dequantize {r['dequantize_s'] * 1e3:7.2f} ms "
                  f"({gbs(r['dequantize_s']):6.1f} GB/s) of {gib:.2f} GiB; keeps "
                  f"{r['blocks_held']}/{num_job} blocks; rel error {r['rel_error']:.2e}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
