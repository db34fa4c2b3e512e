#!/usr/bin/env python3
"""Each family's preset on this GPU: logits against transformers, decode step time against its
bandwidth floor.

For each preset (random weights, built on the device in its published dtype unless ``--dtype``):

1. the runner as the worker builds it (Triton attention, the start-up kernel plan, decode and
   mixed-step CUDA graphs; models with routed experts run eagerly);
2. a check on a short mixed batch (two prompts, a third fed in two chunks beside their decodes,
   then decodes: graph-replayed where the runner has graphs): the logits of each chunk's last
   token against transformers' float32 forward of the whole sequence (``ref32``), within the
   bound tests/gpu uses: ``max |ours - ref32| <= 2 x max |hf_low - ref32| + 1e-3 x max |ref32|``,
   where ``hf_low`` is transformers' own forward in the model's dtype (two half-precision
   forwards of one model differ by their rounding; transformers' error sets the scale). The
   table gives ``max |ours - ref32| / max |ref32|``, the same for transformers, and the share of
   argmax equal to ref32's;
3. decode steps at batch 1 and 64, every sequence at context ``--context`` (512), timed as
   CUDA-graph replays (CUDA events, median of ``--reps`` rounds of 5 back-to-back replays), beside
   the floor: (bytes of weights read + KV bytes read per step) / the device-to-device copy
   bandwidth measured in the same run (bytes read + written per second, bench/engine.py's
   measure). Weights read: every parameter but an untied embedding table (a step reads one row
   of it per sequence); with routed experts, only the experts a step is expected to hit (uniform
   routing: ``E * (1 - (1 - k / E) ** batch)`` per layer). KV read: per layer, each sequence's
   ``min(context + 1, window)`` keys and values.

One family that fails (out of memory, say) prints its error and the others go on. The table is
printed last and, with ``--out``, written as JSON. The goal: Qwen2.5-7B and Llama-3-8B within 1.3x
of the floor at batch 1 and 64.

    python3 bench/gpu/families.py --out $OUT/families.json
    python3 bench/gpu/families.py --presets qwen2.5-7b,llama-3-8b
    python3 bench/gpu/families.py --device cpu --presets tiny-qwen2,tiny-gemma2  # a smoke run, no GPU
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import alise.tools.lab.engine as eb  # copy bandwidth, event timing, floors
from alise.modelinfo.presets import PRESETS
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.cuda_graphs import pick_bucket
from alise.worker.model.families import describe, hf_attention
from alise.worker.model.loader import LoadedModel, preset_config, resolve_dtype
from alise.worker.model.runner import ModelRunner

DEFAULT_PRESETS = ("qwen2.5-7b", "llama-3-8b", "qwen3-8b", "mistral-7b", "phi-3-mini", "gemma-2-9b", "gemma-3-12b",
                   "qwen3-30b-a3b", "mixtral-8x7b")
BATCHES = (1, 64)
BLOCK_SIZE = 16
#: Check schedule: sequence -> tokens fed per step (the third prompt in two chunks beside decodes).
CHECK_SCHEDULE = [{"a": 40, "b": 17}, {"a": 1, "b": 1, "c": 32}, {"a": 1, "b": 1, "c": 28}, {"a": 1, "b": 1, "c": 1},
                  {"a": 1, "b": 1, "c": 1}]
#: The check's bound, as tests/gpu/test_gpu_engine_vs_transformers.py: ours within
#: CHECK_SCALE x transformers' own error in the model's dtype + CHECK_FLOOR x max |ref32|.
CHECK_SCALE, CHECK_FLOOR = 2.0, 1e-3

log = eb.log


def build(name: str, device: torch.device, dtype_arg: str, max_model_len: int) -> LoadedModel:
    """The preset with random weights, straight on ``device`` (no tokenizer: none is needed)."""
    config = preset_config(name)
    max_len = min(config.max_position_embeddings, max_model_len)
    spec = describe(config, max_len)
    dtype = resolve_dtype(dtype_arg, device, config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=hf_attention(spec)).eval()
    return LoadedModel(model=model, tokenizer=None, config=model.config, family=spec.family, name=name,
                       random_weights=True, max_model_len=max_len, eos_token_id=None, device=device, dtype=dtype)


def reference_logits(loaded: LoadedModel, tokens: dict[str, list[int]]) -> tuple[dict, dict]:
    """transformers' logits of each sequence in the model's dtype and in float32 (a float32 copy
    of the weights, made and freed here: twice the model's bytes for a moment)."""
    def forward(model) -> dict:
        return {n: model(torch.tensor([t], device=loaded.device)).logits[0].float() for n, t in tokens.items()}

    with torch.inference_mode():
        low = forward(loaded.model)
        model32 = copy.deepcopy(loaded.model).float()
        ref32 = forward(model32)
    del model32
    gc.collect()
    torch.cuda.empty_cache() if loaded.device.type == "cuda" else None
    return low, ref32


def check(runner: ModelRunner, loaded: LoadedModel, first_block: int) -> dict:
    """CHECK_SCHEDULE through the runner against transformers' forward (see the module docstring)."""
    vocab = loaded.config.vocab_size
    lengths = {n: sum(step.get(n, 0) for step in CHECK_SCHEDULE) for n in "abc"}
    tokens = {n: [(7919 * i + 104729 * ord(n)) % (vocab - 3) + 3 for i in range(k)] for n, k in lengths.items()}
    tables, next_block = {}, first_block
    for n, k in lengths.items():
        tables[n] = list(range(next_block, next_block + -(-k // BLOCK_SIZE)))
        next_block += len(tables[n])
    low, ref32 = reference_logits(loaded, tokens)
    cached = dict.fromkeys(tokens, 0)
    ours_err, hf_err, scale, agree, count = 0.0, 0.0, 0.0, 0, 0
    for step in CHECK_SCHEDULE:
        chunks = [SeqChunk(tokens[n][cached[n]:cached[n] + k], cached[n], tables[n]) for n, k in step.items()]
        for (n, k), row in zip(step.items(), runner.execute(chunks), strict=True):
            cached[n] += k
            ref = ref32[n][cached[n] - 1]
            ours_err = max(ours_err, (row - ref).abs().max().item())
            hf_err = max(hf_err, (low[n][cached[n] - 1] - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            agree += int(row.argmax() == ref.argmax())
            count += 1
    bound = CHECK_SCALE * hf_err + CHECK_FLOOR * scale
    return dict(rel_err=ours_err / max(scale, 1e-6), hf_rel_err=hf_err / max(scale, 1e-6),
                argmax_agree=agree / count, ok=ours_err <= bound)


def floor_bytes(loaded: LoadedModel, runner: ModelRunner, batch: int, context: int) -> float:
    """Bytes a decode step of ``batch`` sequences at ``context`` must read (module docstring)."""
    spec, model = runner.spec, loaded.model
    params = {id(p): p for p in model.parameters()}
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    total = sum(nbytes(p) for p in params.values())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:  # untied: one row per sequence is read
        total -= nbytes(embed) - batch * embed.shape[1] * embed.element_size()
    if spec.moe is not None:
        e, k = spec.moe.num_experts, spec.moe.top_k
        hit = e * (1 - (1 - k / e) ** batch)
        for w in runner._weights:
            if w.moe is not None:
                experts = nbytes(w.moe.experts.gate_up_proj) + nbytes(w.moe.experts.down_proj)
                total -= experts * (1 - hit / e)
    per_token_layer = 2 * spec.num_kv_heads * spec.head_dim * loaded.dtype.itemsize
    kv = sum(batch * min(context + 1, w or context + 1) * per_token_layer for w in spec.windows)
    return total + kv


def decode_chunks(batch: int, context: int, first_block: int, vocab: int) -> list[SeqChunk]:
    per_seq = -(-(context + 1) // BLOCK_SIZE)
    return [SeqChunk([(31 * i + 7) % vocab], context, list(range(first_block + i * per_seq,
                                                                   first_block + (i + 1) * per_seq)))
            for i in range(batch)]


def step_time_s(runner: ModelRunner, chunks: list[SeqChunk], reps: int) -> tuple[float, str]:
    """Median device seconds of one decode step: replays of its graph where one is captured for
    exactly this batch, else eager steps (routed experts; the CPU)."""
    graphs = runner.decode_graphs
    if graphs is not None and graphs.is_captured and pick_bucket(len(chunks), graphs.buckets) == len(chunks):
        graphs.run(chunks)  # fills the bucket's static inputs
        graph, _ = graphs._graphs[len(chunks)]
        return eb.event_time_s(lambda: [graph.replay() for _ in range(5)], reps=reps) / 5, "graph"
    return eb.event_time_s(lambda: runner.execute(chunks), reps=reps), "eager"


def run_family(name: str, args: argparse.Namespace, card: dict) -> dict:
    device = torch.device(args.device)
    start = time.perf_counter()
    loaded = build(name, device, args.dtype, args.max_model_len)
    row = dict(preset=name, family=loaded.family, dtype=str(loaded.dtype).removeprefix("torch."),
               params_b=sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values()) / 1e9)
    per_seq = -(-(args.context + 1) // BLOCK_SIZE)
    check_blocks = 16 + sum(-(-sum(s.get(n, 0) for s in CHECK_SCHEDULE) // BLOCK_SIZE) for n in "abc")
    num_blocks = max(BATCHES) * per_seq + check_blocks
    on_cuda = device.type == "cuda"
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=max(BATCHES),
                         max_num_tokens=args.max_num_tokens, attention_backend="triton" if on_cuda else "torch",
                         plan_file=str(Path(args.plan_dir) / f"{name}.json") if args.plan_dir else "")
    row["start_s"] = time.perf_counter() - start
    row["kv_gb"] = runner.kv_cache.num_bytes / 1e9
    row["windows"] = sorted({w for w in runner.spec.windows if w is not None})
    row["check"] = check(runner, loaded, first_block=max(BATCHES) * per_seq)
    log(f"{name}: built and planned in {row['start_s']:.1f} s; check rel err {row['check']['rel_err']:.2e} "
        f"(transformers in {loaded.dtype}: {row['check']['hf_rel_err']:.2e}), "
        f"argmax agree {row['check']['argmax_agree']:.0%} ({'ok' if row['check']['ok'] else 'FAILED'})")
    runner.kv_cache.key_cache.normal_()  # realistic data to read, never zeros
    runner.kv_cache.value_cache.normal_()
    for batch in BATCHES:
        chunks = decode_chunks(batch, args.context, 0, runner.vocab_size)
        seconds, how = step_time_s(runner, chunks, args.reps)
        floor_s = floor_bytes(loaded, runner, batch, args.context) / card["copy_bytes_per_s"]
        row[f"b{batch}"] = dict(step_ms=seconds * 1e3, floor_ms=floor_s * 1e3, ratio=seconds / floor_s, timed=how)
        log(f"{name}: batch {batch} at context {args.context}: {seconds * 1e3:.3f} ms ({how}) vs floor "
            f"{floor_s * 1e3:.3f} ms -> {seconds / floor_s:.2f}x")
    if args.breakdown and runner.decode_graphs is not None:
        row["breakdown"] = {b: eb.kernel_breakdown(runner, b) for b in BATCHES}
    row["plan"] = runner.plan.report
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'preset':<14} {'family':<10} {'dtype':<9} {'B params':>8} {'err':>9} {'hf err':>9} {'agree':>6} "
            + " ".join(f"{'b' + str(b) + ' ms':>9} {'floor':>7} {'ratio':>6}" for b in BATCHES))
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['preset']:<14} ERROR {r['error']}")
            continue
        c = r["check"]
        cells = " ".join(f"{r[f'b{b}']['step_ms']:9.3f} {r[f'b{b}']['floor_ms']:7.3f} {r[f'b{b}']['ratio']:5.2f}x"
                         for b in BATCHES)
        verdict = "" if c["ok"] else "  CHECK FAILED"
        lines.append(f"{r['preset']:<14} {r['family']:<10} {r['dtype']:<9} {r['params_b']:8.2f} "
                     f"{c['rel_err']:9.2e} {c['hf_rel_err']:9.2e} {c['argmax_agree']:6.0%} {cells}{verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated preset names")
    parser.add_argument("--dtype", default="auto", help="auto (each preset's published dtype), float16, bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=2048, help="caps each preset's context")
    parser.add_argument("--max-num-tokens", type=int, default=128, help="mixed-step graphs' token budget")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--plan-dir", default="", help="keep each preset's kernel plan here (skips re-planning)")
    parser.add_argument("--breakdown", action="store_true", help="top kernels of each decode graph (torch.profiler)")
    parser.add_argument("--out", default="", help="write the table as JSON here")
    args = parser.parse_args()
    names = [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; presets: {', '.join(sorted(PRESETS))}")
    if args.plan_dir:
        Path(args.plan_dir).mkdir(parents=True, exist_ok=True)
    card = eb.measure_card(args.device)
    log(f"{card['device']}: device-to-device copy {card['copy_bytes_per_s'] / 1e12:.3f} TB/s (bytes read + written)")
    rows = []
    for name in names:
        try:
            rows.append(run_family(name, args, card))
        except Exception as exc:  # one family's failure must not stop the others
            log(f"{name}: FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
            rows.append(dict(preset=name, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    log("\n" + table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(date=datetime.date.today().isoformat(), card=card,
                                                  context=args.context, command=" ".join(sys.argv), rows=rows),
                                             indent=1), encoding="utf-8")
    return 0 if all("error" not in r and r["check"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
