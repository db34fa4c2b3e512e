#!/usr/bin/env python3
"""The engine before and after the fused kernels, in one process, on this GPU: issue 20's table
and the mixed-step table of chunked prefill.

One model (OPT-13B shapes, random fp16 weights by default) is built once; two runners use it in
turn, each with its own KV cache: ``before`` (no start-up planning: cuBLAS, torch norms, per-chunk
prefill attention, mixed steps eager; the runner as it was) and ``after`` (the default: fused
kernels checked and timed at start-up, mixed-step CUDA graphs). For each:

- prefill of 512 and 2,000 tokens and decode at batch 1/8/32/64 with 512 cached tokens, beside
  their floors (bench/engine.py's measurement: forward + greedy tokens read back, median);
- mixed steps: a decode batch (8/32/64 at context 512) alone and beside one chunk of
  64/128/256/512 tokens starting at position 256 (a later chunk of a prompt), graph and eager,
  with the expected cost ``decode step + chunk FLOPs / matmul rate``;
- the after runner's kernel plan (what start-up checked, measured and chose), where its decode
  graphs' time goes (torch.profiler at batch 1 and 64), and with ``--profile PATH`` its latency
  profile (alise.worker.model.profiler) for the scheduler and the simulator.

    python3 bench/gpu/engine_compare.py --json $OUT/engine_compare.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

import alise.tools.lab.engine as eb  # copy bandwidth, event timing, floors
from alise.core.sampling import SamplingParams
from alise.modelinfo.presets import PRESETS
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kv_cache import KVCache
from alise.worker.model.loader import LoadedModel, resolve_dtype
from alise.worker.model.runner import ModelRunner
from alise.worker.model.sampler import Sampler

MIXED_BATCHES = (8, 32, 64)
CHUNKS = (64, 128, 256, 512)
CHUNK_START = 256


def build_preset(name: str, dtype: str, device: str) -> LoadedModel:
    """A preset architecture with random weights, without its tokenizer (the bench needs no text,
    and the GPU image lacks the tokenizer package)."""
    fields = dict(PRESETS[name])
    family = fields.pop("family")
    config = (OPTConfig if family == "opt" else LlamaConfig)(**fields, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    torch.manual_seed(0)
    with torch_device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
    return LoadedModel(model=model, tokenizer=None, config=model.config, family=family, name=name,
                       random_weights=True, max_model_len=config.max_position_embeddings, eos_token_id=2,
                       device=torch_device, dtype=torch_dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def chunk_flops(fig: dict, n: int, start: int) -> float:
    """Matmul FLOPs of a chunk of ``n`` tokens after ``start`` cached ones (linear layers, causal
    attention over ``start + i + 1`` keys per query; the LM head row is in the decode step)."""
    return 2 * n * fig["linear_params"] + 4 * n * (start + (n + 1) / 2) * fig["hidden"] * fig["layers"]


def mixed_table(runner: ModelRunner, fig: dict, flops_per_s: float, label: str) -> list[dict]:
    sampler = Sampler()
    vocab, bs = runner.vocab_size, eb.BLOCK_SIZE
    per_seq = -(-(eb.CONTEXT + 1) // bs)

    def step(chunks):
        params = [SamplingParams(temperature=0.0)] * len(chunks)
        return sampler.sample(runner.execute(chunks), params, [None] * len(chunks))

    rows = []
    for batch in MIXED_BATCHES:
        decodes = [SeqChunk([(13 * i + 1) % vocab], eb.CONTEXT, list(range(i * per_seq, (i + 1) * per_seq)))
                   for i in range(batch)]
        decode_s = eb.wall_time_s(partial(step, decodes), reps=10)
        rows.append(dict(runner=label, batch=batch, chunk=0, path="graph", ms=decode_s * 1e3))
        first = batch * per_seq
        for n in CHUNKS:
            table = list(range(first, first + -(-(CHUNK_START + n) // bs)))
            chunks = decodes + [SeqChunk([(7 * i + 3) % vocab for i in range(n)], CHUNK_START, table)]
            expected_ms = (decode_s + chunk_flops(fig, n, CHUNK_START) / flops_per_s) * 1e3
            graphs = runner.mixed_graphs
            in_graph = graphs is not None and graphs.can_run(chunks)
            paths = ["graph", "eager"] if in_graph else ["eager"]
            for path in paths:
                if path == "eager":
                    runner.mixed_graphs = None
                ms = eb.wall_time_s(partial(step, chunks), reps=7) * 1e3
                runner.mixed_graphs = graphs
                rows.append(dict(runner=label, batch=batch, chunk=n, path=path, ms=ms, expected_ms=expected_ms))
                eb.log(f"{label}: batch {batch} + chunk {n} at {CHUNK_START} ({path}): {ms:.2f} ms "
                       f"(decode alone {decode_s * 1e3:.2f}, expected {expected_ms:.2f})")
    return rows


def check_steps(runner: ModelRunner) -> list[list[SeqChunk]]:
    """Steps whose logits the two runners must agree on: decode batch 8, and batch 8 beside a chunk."""
    vocab, bs = runner.vocab_size, eb.BLOCK_SIZE
    per_seq = -(-(eb.CONTEXT + 1) // bs)
    decodes = [SeqChunk([(13 * i + 1) % vocab], eb.CONTEXT, list(range(i * per_seq, (i + 1) * per_seq)))
               for i in range(8)]
    n = CHUNKS[len(CHUNKS) // 2]
    chunk = SeqChunk([(7 * i + 3) % vocab for i in range(n)], CHUNK_START,
                     list(range(8 * per_seq, 8 * per_seq + -(-(CHUNK_START + n) // bs))))
    return [decodes, decodes + [chunk]]


def build_runner(loaded, label: str, kv_gib: float, args) -> tuple[ModelRunner, float]:
    kv_bytes = int(kv_gib * 2**30) if kv_gib else torch.cuda.mem_get_info()[0] - (10 << 30)
    num_blocks = KVCache.num_blocks_for_budget(loaded.config, eb.BLOCK_SIZE, loaded.dtype, kv_bytes)
    start = time.perf_counter()
    fast = label == "after"
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=eb.BLOCK_SIZE, max_num_seqs=args.max_num_seqs,
                         max_num_tokens=args.max_num_tokens if fast else 0, fast_kernels=fast)
    startup_s = time.perf_counter() - start
    eb.log(f"{label}: {num_blocks} KV blocks, start-up (planning + graph capture) {startup_s:.1f} s")
    torch.manual_seed(1)  # the same random K/V in both runners' caches (same size)
    runner.kv_cache.key_cache.normal_()
    runner.kv_cache.value_cache.normal_()
    return runner, startup_s


def bench_runner(runner: ModelRunner, startup_s: float, fig: dict, card: dict, label: str) -> dict:
    with torch.inference_mode():
        logits = [runner.execute(step).cpu() for step in check_steps(runner)]  # before any other step
    results: dict = {}
    dtype = runner.loaded.dtype
    bw, flops = card["copy_bytes_per_s"], card["matmul_flops_per_s"]["bf16" if dtype == torch.bfloat16 else "fp16"]
    for n in eb.PREFILL_LENS:
        results[f"prefill_{n}"] = dict(floor_s=eb.prefill_flops(fig, n) / flops)
    for batch in eb.DECODE_BATCHES:
        results[f"decode_{batch}"] = dict(floor_s=eb.decode_bytes(fig, batch, eb.CONTEXT) / bw)
    eb.bench_engine(runner, results)
    out = dict(label=label, startup_s=startup_s, results=results, logits=logits,
               mixed=mixed_table(runner, fig, flops, label), plan=list(runner.plan.report),
               mixed_graph_tokens=list(runner.plan.mixed_graph_tokens))
    if label == "after" and runner.decode_graphs is not None:
        try:
            out["breakdown"] = {b: eb.kernel_breakdown(runner, b) for b in (1, 64)}
        except Exception as exc:  # a diagnostic; never lose the run to it
            eb.log(f"kernel breakdown failed: {exc!r}")
    return out


def free(runner: ModelRunner) -> None:
    del runner
    gc.collect()  # the runner and its graphs' closures form a cycle; free the KV cache now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile(runner: ModelRunner, path: str, args) -> None:
    from alise.worker.model.profiler import profile_runner, save_profile

    start = time.perf_counter()
    model = profile_runner(runner, max_num_seqs=min(64, args.max_num_seqs),
                           command="bench/gpu/engine_compare.py --profile")
    save_profile(model, path)
    eb.log(f"profile: {model.meta['num_samples']} points in {time.perf_counter() - start:.1f} s, fit mean rel "
           f"error {model.meta['fit_mean_rel_error']:.3f} -> {path}")


def tables(runs: list[dict]) -> str:
    before, after = runs
    lines = ["", f"{'step':<26}{'floor ms':>10}{'before ms':>11}{'after ms':>10}{'before/fl':>11}{'after/fl':>10}"]
    for key, row in after["results"].items():
        b, a, f = before["results"][key]["engine_s"], row["engine_s"], row["floor_s"]
        label = f"prefill {key[8:]} tok" if key.startswith("prefill") else f"decode b={key[7:]} ctx={eb.CONTEXT}"
        lines.append(f"{label:<26}{f * 1e3:>10.2f}{b * 1e3:>11.2f}{a * 1e3:>10.2f}{b / f:>11.2f}{a / f:>10.2f}")
    lines += ["", f"mixed steps: decode batch at ctx {eb.CONTEXT} + one chunk at {CHUNK_START} (ms; expected = "
                  "decode alone + chunk FLOPs / matmul rate)",
              f"{'batch':>5}{'chunk':>7}{'expected':>10}{'before eager':>14}{'after eager':>13}{'after graph':>13}"
              f"{'graph/exp':>11}"]
    cell = {(r["runner"], r["batch"], r["chunk"], r["path"]): r for r in before["mixed"] + after["mixed"]}
    for batch in MIXED_BATCHES:
        for n in (0, *CHUNKS):
            get = lambda *k: cell.get(k, {}).get("ms")  # noqa: E731
            exp = cell.get(("after", batch, n, "eager"), {}).get("expected_ms")
            be = get("before", batch, n, "eager") if n else get("before", batch, 0, "graph")
            ae = get("after", batch, n, "eager")
            ag = get("after", batch, n, "graph")
            fmt = lambda x: f"{x:.2f}" if x else "-"  # noqa: E731
            ratio = f"{ag / exp:.2f}" if ag and exp else "-"
            lines.append(f"{batch:>5}{n:>7}{fmt(exp):>10}{fmt(be):>14}{fmt(ae):>13}{fmt(ag):>13}{ratio:>11}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--json", default="engine_compare.json")
    parser.add_argument("--kv-gib", type=float, default=40.0, help="KV cache per runner (0: free memory - 10 GiB)")
    parser.add_argument("--max-num-seqs", type=int, default=72, help="65 sequences: 64 decodes + a chunk")
    parser.add_argument("--max-num-tokens", type=int, default=576, help="largest mixed-step graph (64 decodes + 512)")
    parser.add_argument("--profile", default="", help="also measure the after runner's latency profile into this file")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (--smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, to check the script")
    args = parser.parse_args()
    if args.smoke:
        global MIXED_BATCHES, CHUNKS, CHUNK_START
        eb.CONTEXT, eb.DECODE_BATCHES, eb.PREFILL_LENS = 64, (1, 4), (32, 100)
        MIXED_BATCHES, CHUNKS, CHUNK_START = (2,), (16, 32), 16
        args.model, args.kv_gib, args.max_num_seqs, args.max_num_tokens = "tiny-opt", 0.01, 8, 64
    torch.manual_seed(0)
    card = eb.measure_card(args.device)
    eb.log(f"card: {card['device']}, copy {card['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul "
           + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in card["matmul_flops_per_s"].items()))
    loaded = build_preset(args.model, args.dtype, args.device)
    fig = eb.model_figures(loaded)
    runner, startup_s = build_runner(loaded, "before", args.kv_gib, args)
    runs = [bench_runner(runner, startup_s, fig, card, "before")]
    free(runner)
    runner, startup_s = build_runner(loaded, "after", args.kv_gib, args)
    runs.append(bench_runner(runner, startup_s, fig, card, "after"))
    for line in runs[1]["plan"]:
        eb.log(f"plan: {line}")
    agreement = [rel_error(a, b) for a, b in zip(runs[1].pop("logits"), runs[0].pop("logits"), strict=True)]
    Path(args.json).write_text(json.dumps(dict(date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
                                               card=card, model=args.model, dtype=args.dtype, figures=fig,
                                               logits_rel_err_after_vs_before=agreement, runs=runs),
                                          indent=2, default=str))
    eb.log(tables(runs))
    eb.log(f"logits after vs before, ||a - b|| / ||b||: decode batch 8 {agreement[0]:.1e}, + chunk "
           f"{agreement[1]:.1e} (fp16 rounding of a 40-layer model: ~1e-3)")
    if args.profile:  # last: the tables are out even if the stage's time runs out here
        profile(runner, args.profile, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
