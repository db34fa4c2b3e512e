"""Engine step times on this GPU beside a plain transformers forward and beside their floors.

One run (one device call): measures the card's copy bandwidth (bytes read + written) and fp16/bf16
matmul rate; builds OPT-13B-shaped random weights (fp16); times, for this engine (Triton paged
attention, CUDA-graph decode, fused projections) and for transformers' own forward with its
DynamicCache over the SAME weights:

- prefill of 512 and 2,000 tokens (one sequence),
- decode steps at batch 1, 8, 32, 64 with 512 cached tokens per sequence.

Each figure is printed beside its floor: decode = (weight bytes + KV bytes read) / bandwidth;
prefill = FLOPs / matmul rate. A step is timed as the worker times it: forward plus greedy
token choice, up to reading the tokens back on the host (median of several, after warm-up).
Optionally (``--profile PATH``) it also runs the latency profiler on the same runner and writes
the fitted profile. Results go to ``--json``; a table is printed last.

    python bench/engine.py --json $OUT/engine.json --profile $OUT/p.json

bench/gpu/families.py and bench/gpu/engine_compare.py time with the same functions.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from alise.core.sampling import SamplingParams
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kv_cache import KVCache
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from alise.worker.model.sampler import Sampler

CONTEXT = 512
DECODE_BATCHES = (1, 8, 32, 64)
PREFILL_LENS = (512, 2000)
BLOCK_SIZE = 16


def log(*args) -> None:
    print(*args, flush=True)


def event_time_s(fn, reps: int, warmup: int = 3) -> float:
    """Median device seconds of ``fn`` (CUDA events around each call; wall clock on the CPU)."""
    if not torch.cuda.is_available():
        return wall_time_s(fn, reps, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def wall_time_s(fn, reps: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn``, which must end with a host sync (a token read-back)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graph_time_s(fn, launches: int = 10, reps: int = 10) -> float:
    """Device seconds of one ``fn`` call, from a CUDA graph of ``launches`` calls (no launch gaps)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    seconds = event_time_s(graph.replay, reps=reps, warmup=2) / launches
    del graph
    return seconds


def tune_decode_kernel(heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Sweeps the decode kernel's launch configurations at context 512 (graph-timed, checked against
    the reference), keeps the fastest in ``triton_attention.DECODE_CONFIG``, returns the sweep."""
    from alise.worker.kernels import triton_attention
    from alise.worker.model import attention as ref_attention

    config = triton_attention.DECODE_CONFIG
    per_seq = -(-(CONTEXT + 1) // BLOCK_SIZE)
    max_batch = max(DECODE_BATCHES)
    shape = (max_batch * per_seq, BLOCK_SIZE, heads, head_dim)
    key_cache = torch.randn(shape, device="cuda", dtype=dtype)
    value_cache = torch.randn(shape, device="cuda", dtype=dtype)
    tables = torch.randperm(shape[0], device="cuda").view(max_batch, per_seq)
    lens = torch.full((max_batch,), CONTEXT, device="cuda")
    query = torch.randn(max_batch, heads, head_dim, device="cuda", dtype=dtype)
    scale = head_dim ** -0.5

    def case(batch: int):
        return (query[:batch], key_cache, value_cache, tables[:batch], lens[:batch], scale)

    ref = {b: ref_attention.decode_attention(query[:b].float(), key_cache.float(), value_cache.float(), tables[:b],
                                             lens[:b], scale) for b in (1, max_batch)}
    kv_bytes = {b: 2 * b * CONTEXT * heads * head_dim * dtype.itemsize for b in DECODE_BATCHES}
    sweep = []
    base = dict(config)
    for dot, block_n, warps, stages in itertools.product((False, True), (32, 64, 128), (4, 8), (1, 2, 3)):
        config.update(base, dot_for_mha=dot, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            errors = [((triton_attention.decode_attention(*case(b)).float() - ref[b]).norm() / ref[b].norm()).item()
                      for b in ref]
            times = {b: graph_time_s(lambda b=b: triton_attention.decode_attention(*case(b))) for b in (1, max_batch)}
        except Exception as exc:  # a configuration that does not compile or fit is skipped
            sweep.append(dict(dot=dot, block_n=block_n, warps=warps, stages=stages, error=repr(exc)[:200]))
            continue
        sweep.append(dict(dot=dot, block_n=block_n, warps=warps, stages=stages, max_rel_err=max(errors),
                          us={b: t * 1e6 for b, t in times.items()},
                          tb_per_s={b: kv_bytes[b] / t / 1e12 for b, t in times.items()}))
    good = [r for r in sweep if "us" in r and r["max_rel_err"] < 3e-3]
    # Large batches carry nearly all decode-attention time; batch 1 breaks ties.
    best = min(good, key=lambda r: r["us"][max_batch] + 4 * r["us"][1])
    config.update(base, dot_for_mha=best["dot"], block_n=best["block_n"], num_warps=best["warps"],
                  num_stages=best["stages"])
    splits = []
    for per_sm in (1, 2, 4, 8, 16):
        config.update(programs_per_sm=per_sm, max_splits=32)
        times = {b: graph_time_s(lambda b=b: triton_attention.decode_attention(*case(b))) for b in DECODE_BATCHES}
        splits.append(dict(programs_per_sm=per_sm, us={b: t * 1e6 for b, t in times.items()}))
    fastest = {b: min(r["us"][b] for r in splits) for b in DECODE_BATCHES}
    best_split = min(splits, key=lambda r: sum(r["us"][b] / fastest[b] for b in DECODE_BATCHES))
    config.update(programs_per_sm=best_split["programs_per_sm"])
    for row in sorted(good, key=lambda r: r["us"][max_batch])[:8]:
        log(f"tune: dot={row['dot']!s:5} block_n={row['block_n']:3} warps={row['warps']} stages={row['stages']}: "
            f"b1 {row['us'][1]:6.1f} us ({row['tb_per_s'][1]:.2f} TB/s), b{max_batch} {row['us'][max_batch]:6.1f} us "
            f"({row['tb_per_s'][max_batch]:.2f} TB/s), err {row['max_rel_err']:.1e}")
    for row in splits:
        log(f"tune: programs_per_sm={row['programs_per_sm']:2}: "
            + ", ".join(f"b{b} {t:6.1f} us" for b, t in row["us"].items()))
    log(f"tune: chosen {json.dumps(config)}")
    return dict(sweep=sweep, splits=splits, chosen=dict(config))


def compare_blas(hidden: int, ffn: int, dtype: torch.dtype) -> dict:
    """OPT-13B's GEMV/GEMM shapes under cuBLAS and cuBLASLt; returns achieved weight bandwidth."""
    shapes = {"qkv": (3 * hidden, hidden), "out": (hidden, hidden), "fc1": (ffn, hidden), "fc2": (hidden, ffn)}
    out: dict = {}
    for backend in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(backend)
        for name, (n_out, n_in) in shapes.items():
            weight = torch.randn(n_out, n_in, device="cuda", dtype=dtype)
            bias = torch.randn(n_out, device="cuda", dtype=dtype)
            for batch in (1, 64):
                x = torch.randn(batch, n_in, device="cuda", dtype=dtype)
                t = graph_time_s(lambda x=x, w=weight, b=bias: torch.nn.functional.linear(x, w, b))
                out[f"{backend}/{name}/b{batch}"] = dict(us=t * 1e6,
                                                         tb_per_s=weight.numel() * dtype.itemsize / t / 1e12)
    torch.backends.cuda.preferred_blas_library("cublas")
    for key, row in out.items():
        log(f"blas {key:22}: {row['us']:7.1f} us, {row['tb_per_s']:.2f} TB/s of weights")
    return out


def kernel_breakdown(runner: ModelRunner, batch: int) -> list:
    """Top kernels of a decode graph replay (torch.profiler), to see where the step goes."""
    from torch.profiler import ProfilerActivity, profile

    graph, _ = runner.decode_graphs._graphs[batch]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    kernels = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total_ms = sum(item.device_time_total for item in kernels) / 5 / 1e3
    log(f"  b{batch}: {sum(item.count for item in kernels) // 5} kernels a step, {total_ms:.3f} ms of kernel time")
    for item in kernels[:16]:
        rows.append(dict(name=item.key[:90], ms_per_step=item.device_time_total / 5 / 1e3, count=item.count // 5))
        log(f"  b{batch}: {rows[-1]['ms_per_step']:7.3f} ms/step x{rows[-1]['count']:4}  {rows[-1]['name']}")
    return rows


def measure_card(device: str) -> dict:
    on_cuda = device.startswith("cuda")
    num_bytes = 2 << 30 if on_cuda else 64 << 20
    size = 8192 if on_cuda else 512
    src = torch.randn(num_bytes // 2, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    copy_s = event_time_s(lambda src=src, dst=dst: dst.copy_(src), reps=20)
    del src, dst
    rates = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        rates[name] = 2 * size ** 3 / event_time_s(lambda a=a, b=b: a @ b, reps=10)
    card = dict(device="CPU", copy_bytes_per_s=2 * num_bytes / copy_s, matmul_flops_per_s=rates,
                torch=torch.__version__)
    if on_cuda:
        torch.cuda.empty_cache()
        props = torch.cuda.get_device_properties(0)
        card.update(device=torch.cuda.get_device_name(0), num_sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    return card


def model_figures(loaded) -> dict:
    cfg = loaded.config
    params = {id(p): p for p in loaded.model.parameters()}.values()  # tied weights once
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    if loaded.family == "opt":
        linear_params = layers * (4 * hidden * hidden + 2 * hidden * cfg.ffn_dim)
    else:  # grouped K/V projections, gate + up + down
        kv = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
        linear_params = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * cfg.intermediate_size)
    kv_bytes_per_token = KVCache.block_bytes(cfg, 1, loaded.dtype)
    return dict(weight_bytes=weight_bytes, linear_params=linear_params, kv_bytes_per_token=kv_bytes_per_token,
                hidden=hidden, layers=layers, vocab=cfg.vocab_size)


def prefill_flops(fig: dict, n: int) -> float:
    """Matmul FLOPs of a prefill of ``n`` tokens: the linear layers on every token, causal
    attention (QK^T and PV over half the square), the LM head on the last token."""
    return 2 * n * fig["linear_params"] + 2 * n * n * fig["hidden"] * fig["layers"] + 2 * fig["hidden"] * fig["vocab"]


def decode_bytes(fig: dict, batch: int, context: int) -> float:
    return fig["weight_bytes"] + batch * context * fig["kv_bytes_per_token"]


# --------------------------------------------------------------------------- this engine

def bench_engine(runner: ModelRunner, results: dict) -> None:
    sampler = Sampler()
    vocab = runner.vocab_size

    def step(chunks):
        params = [SamplingParams(temperature=0.0)] * len(chunks)
        return sampler.sample(runner.execute(chunks), params, [None] * len(chunks))

    for n in PREFILL_LENS:
        chunks = [SeqChunk([(7 * i + 3) % vocab for i in range(n)], 0, list(range(-(-n // BLOCK_SIZE))))]
        results[f"prefill_{n}"]["engine_s"] = wall_time_s(partial(step, chunks), reps=5)
        log(f"engine prefill {n}: {results[f'prefill_{n}']['engine_s'] * 1e3:.2f} ms")
    per_seq = -(-(CONTEXT + 1) // BLOCK_SIZE)
    for batch in DECODE_BATCHES:
        chunks = [SeqChunk([(13 * i + 1) % vocab], CONTEXT, list(range(i * per_seq, (i + 1) * per_seq)))
                  for i in range(batch)]
        row = results[f"decode_{batch}"]
        row["engine_s"] = wall_time_s(partial(step, chunks), reps=20)
        graphs = runner.decode_graphs
        if graphs is not None and graphs.is_captured:
            graph, _ = graphs._graphs[batch]
            row["engine_graph_replay_s"] = event_time_s(graph.replay, reps=20)
            saved, runner.decode_graphs = runner.decode_graphs, None
            row["engine_eager_s"] = wall_time_s(partial(step, chunks), reps=5)
            runner.decode_graphs = saved
        log(f"engine decode batch {batch}: {row['engine_s'] * 1e3:.2f} ms/step "
            f"(graph replay on the GPU {row.get('engine_graph_replay_s', 0) * 1e3:.2f} ms, "
            f"eager {row.get('engine_eager_s', 0) * 1e3:.2f} ms)")


def bench_attention_kernel(runner: ModelRunner, results: dict) -> None:
    """The decode kernel alone on one layer at batch 1 and 64, context 512: achieved KV bandwidth."""
    if runner.attention_backend.name != "triton":
        return
    from alise.worker.kernels import triton_attention

    cfg = runner.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    per_seq = -(-(CONTEXT + 1) // BLOCK_SIZE)
    for batch in (1, 64):
        tables = torch.arange(batch * per_seq, device="cuda").view(batch, per_seq)
        lens = torch.full((batch,), CONTEXT, device="cuda")
        query = torch.randn(batch, heads, head_dim, device="cuda", dtype=runner.loaded.dtype)
        key_cache, value_cache = runner.kv_cache.layer(0)
        seconds = event_time_s(partial(triton_attention.decode_attention, query, key_cache, value_cache, tables,
                                       lens, head_dim ** -0.5), reps=50)
        kv_bytes = 2 * batch * CONTEXT * heads * head_dim * runner.loaded.dtype.itemsize
        results[f"kernel_decode_{batch}"] = dict(seconds=seconds, kv_bytes=kv_bytes,
                                                 bytes_per_s=kv_bytes / seconds)
        log(f"decode kernel, one layer, batch {batch} ctx {CONTEXT}: {seconds * 1e6:.1f} us, "
            f"{kv_bytes / seconds / 1e12:.2f} TB/s")


# --------------------------------------------------------------------------- transformers

def hf_cache(model, batch: int, context: int, dtype: torch.dtype, device: torch.device):
    """A DynamicCache of ``context`` random positions for ``batch`` sequences."""
    from transformers import DynamicCache

    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        key = torch.randn(batch, heads, context, head_dim, device=device, dtype=dtype)
        cache.update(key, torch.randn_like(key), layer)
    return cache


def trim_cache(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # a negative argument removes that many tokens in every transformers 5.x


def bench_transformers(model, results: dict, dtype: torch.dtype, device: torch.device) -> None:
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for n in PREFILL_LENS:
            ids = torch.tensor([[(7 * i + 3) % vocab for i in range(n)]], device=device)
            # logits_to_keep=1: the LM head on the last token only, as generate() does.
            results[f"prefill_{n}"]["hf_s"] = wall_time_s(
                lambda ids=ids: model(ids, logits_to_keep=1).logits[:, -1].argmax(-1).tolist(), reps=5)
            log(f"transformers prefill {n}: {results[f'prefill_{n}']['hf_s'] * 1e3:.2f} ms")
        for batch in DECODE_BATCHES:
            cache = hf_cache(model, batch, CONTEXT, dtype, device)
            ids = torch.tensor([[(13 * i + 1) % vocab] for i in range(batch)], device=device)
            times = []
            for i in range(12):
                start = time.perf_counter()
                model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1).tolist()
                if i >= 2:
                    times.append(time.perf_counter() - start)
                trim_cache(cache, CONTEXT)  # keep the context at 512 (untimed)
            results[f"decode_{batch}"]["hf_s"] = statistics.median(times)
            log(f"transformers decode batch {batch}: {statistics.median(times) * 1e3:.2f} ms/step")
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------- main

def table(results: dict, card: dict, fig: dict) -> str:
    lines = [f"{'step':<24}{'engine ms':>11}{'transformers ms':>17}{'floor ms':>10}{'engine/floor':>14}"
             f"{'hf/floor':>10}{'hf/engine':>11}"]
    for key, row in results.items():
        if not key.startswith(("prefill_", "decode_")):
            continue
        e, h, f = row.get("engine_s"), row.get("hf_s"), row["floor_s"]
        label = (f"prefill {key.split('_')[1]} tok" if key.startswith("prefill") else
                 f"decode b={key.split('_')[1]} ctx={CONTEXT}")
        fmt = lambda x: f"{x * 1e3:.2f}" if x else "-"  # noqa: E731
        lines.append(f"{label:<24}{fmt(e):>11}{fmt(h):>17}{f * 1e3:>10.2f}"
                     f"{(e / f if e else 0):>14.2f}{(h / f if h else 0):>10.2f}{(h / e if e and h else 0):>11.2f}")
    bw = card["copy_bytes_per_s"]
    lines.append(f"floors: decode = (weights {fig['weight_bytes'] / 1e9:.2f} GB + KV) / copy bandwidth "
                 f"{bw / 1e12:.2f} TB/s; prefill = FLOPs / fp16 matmul {card['matmul_flops_per_s']['fp16'] / 1e12:.0f}"
                 f" TFLOP/s; device {card['device']}")
    return "\n".join(lines)


def _decode_config() -> dict | None:
    try:
        from alise.worker.kernels import triton_attention
    except ImportError:
        return None
    return dict(triton_attention.DECODE_CONFIG)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--json", default="engine_bench.json")
    parser.add_argument("--profile", default="", help="also run the latency profiler; write the profile here")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run with a tiny model")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--kv-gib", type=float, default=0.0, help="KV cache size (default: free memory - 8 GiB)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--tune", action="store_true", help="sweep the decode kernel's launch config first")
    parser.add_argument("--blas", action="store_true", help="compare cuBLAS and cuBLASLt on the model's shapes")
    args = parser.parse_args()
    grid = None
    if args.smoke:
        global CONTEXT, DECODE_BATCHES, PREFILL_LENS
        CONTEXT, DECODE_BATCHES, PREFILL_LENS = 64, (1, 4), (32, 100)
        from alise.worker.model.profiler import ProfileGrid

        grid = ProfileGrid(decode_batch_sizes=(1, 4), decode_contexts=(16, 64), prefill_lens=(16, 64),
                           mixed=((32, 2, 32),), multi=((2, 16, 2, 32),), repeats=1)
    command = "python " + " ".join(sys.argv)
    torch.manual_seed(0)
    card = measure_card(args.device)
    log(f"card: {card['device']}, copy {card['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), matmul "
        + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in card["matmul_flops_per_s"].items()))

    extra: dict = {}
    if args.tune:
        start = time.perf_counter()
        extra["tune"] = tune_decode_kernel(40, 128, torch.float16)
        torch.cuda.empty_cache()
        log(f"tuned in {time.perf_counter() - start:.1f} s")
    if args.blas:
        extra["blas"] = compare_blas(5120, 20480, torch.float16)
    start = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    sync()
    fig = model_figures(loaded)
    log(f"{args.model}: {fig['weight_bytes'] / 1e9:.2f} GB of weights, built in {time.perf_counter() - start:.1f} s")
    if args.kv_gib:
        kv_bytes = int(args.kv_gib * 2**30)
    else:
        kv_bytes = torch.cuda.mem_get_info()[0] - (8 << 30)
    num_blocks = KVCache.num_blocks_for_budget(loaded.config, BLOCK_SIZE, loaded.dtype, kv_bytes)
    start = time.perf_counter()
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=max(DECODE_BATCHES))
    capture_s = time.perf_counter() - start
    log(f"runner: {num_blocks} KV blocks, {runner.attention_backend.name} attention, "
        f"graphs for {runner.decode_graphs.buckets if runner.decode_graphs else None} in {capture_s:.1f} s")
    runner.kv_cache.key_cache.normal_()
    runner.kv_cache.value_cache.normal_()

    bw = card["copy_bytes_per_s"]
    flops = card["matmul_flops_per_s"]["fp16"]
    results: dict = {}
    for n in PREFILL_LENS:
        results[f"prefill_{n}"] = dict(flops=prefill_flops(fig, n), floor_s=prefill_flops(fig, n) / flops)
    for batch in DECODE_BATCHES:
        num_bytes = decode_bytes(fig, batch, CONTEXT)
        results[f"decode_{batch}"] = dict(bytes=num_bytes, floor_s=num_bytes / bw)
    bench_engine(runner, results)
    bench_attention_kernel(runner, results)
    if runner.decode_graphs is not None and runner.decode_graphs.is_captured:
        graph, _ = runner.decode_graphs._graphs[1]
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        extra["graph_launch_host_s"] = time.perf_counter() - start
        torch.cuda.synchronize()
        log(f"host time of one graph launch (batch 1): {extra['graph_launch_host_s'] * 1e6:.0f} us")
        try:
            extra["breakdown"] = {b: kernel_breakdown(runner, b) for b in (1, 64)}
        except Exception as exc:  # the profiler is a diagnostic; never lose the run to it
            log(f"kernel breakdown failed: {exc!r}")

    profile_meta = None
    if args.profile:
        from alise.worker.model.profiler import profile_runner, save_profile

        start = time.perf_counter()
        profile = profile_runner(runner, grid=grid, command=command)
        save_profile(profile, args.profile)
        profile_meta = {k: v for k, v in profile.meta.items() if k != "samples"}
        log(f"profile: {profile.meta['num_samples']} points in {time.perf_counter() - start:.1f} s, fit mean rel "
            f"error {profile.meta['fit_mean_rel_error']:.3f}, max {profile.meta['fit_max_rel_error']:.3f} -> "
            f"{args.profile}")
        log(f"  c0 {profile.c0_s * 1e3:.3f} ms, c_seq {profile.c_seq_s * 1e6:.2f} us, c_ctx {profile.c_ctx_s * 1e9:.2f}"
            f" ns/token, c_pre {profile.c_pre_s * 1e6:.2f} us/token, c_pre2 {profile.c_pre2_s * 1e12:.3f} ps/token^2")

    del runner
    gc.collect()  # the runner and its graphs' closures form a cycle; free the KV cache now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not args.skip_transformers:
        bench_transformers(loaded.model, results, loaded.dtype, loaded.device)

    out = dict(date=datetime.date.today().isoformat(), command=command, card=card, model=args.model,
               model_figures=fig, context=CONTEXT, capture_s=capture_s, results=results, profile=profile_meta,
               decode_kernel_config=_decode_config(), **extra)
    Path(args.json).write_text(json.dumps(out, indent=2))
    log("")
    log(table(results, card, fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
