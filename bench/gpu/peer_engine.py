"""The engines alone, ALISE's and vLLM's, on the same GPU and model shapes (OPT-13B, random fp16).

Four steps, each the median of several:

* prefill of 512 and of 2,000 tokens (one sequence, its first token chosen);
* a decode step at batch 1 and at batch 64 with about 512 tokens of context per sequence.

``--engine alise``: the worker's ModelRunner as the worker builds it (fused kernels checked and
timed at start-up, CUDA graphs), timed as bench/engine.py times it: forward plus greedy token
choice up to the tokens read back on the host, decodes at a context of 512. The card's copy
bandwidth and matmul rate are measured too, for the floors.

``--engine vllm``: vLLM's engine through its ``LLM`` class with dummy weights (FlashAttention 3,
torch.compile, CUDA graphs), the scheduler in the loop as in serving: a prefill is a request of
N random tokens generating one; a decode step is ``(T(257) - T(129)) / 128`` where T(n) is the
time of a batch of requests of 320 random tokens generating n tokens each (ignore_eos, greedy):
the 128 steps between hold every sequence decoding, at contexts 448 to 576 (mean 512). The
engine's arguments match the server's in peer_vllm.sh (max_num_seqs 64, max_num_batched_tokens
8,192, block size 16), so the two share torch.compile's cache; prefix caching is off so no
prompt is served from cache; 4,096 KV blocks hold 64 sequences of 577 tokens.

``--table A.json B.json`` prints both side by side with the floors (decode: weights plus the
KV read over the copy bandwidth; prefill: FLOPs over the matmul rate).

    python3 bench/gpu/peer_engine.py --engine alise --json $OUT/engine-alise.json
    PYTHONPATH=/tmp/vllm-site python3 bench/gpu/peer_engine.py --engine vllm --model .peercarry/model \
        --json $OUT/engine-vllm.json
    python3 bench/gpu/peer_engine.py --table $OUT/engine-alise.json $OUT/engine-vllm.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PREFILLS = (512, 2000)
BATCHES = (1, 64)
CONTEXT = 512


def run_alise(args) -> dict:
    import logging

    import torch

    # The start-up kernel plan's choices (which fresh-prompt attention won, at what times) into
    # the engine's log, as a worker logs them.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("alise.worker.model.tuning").setLevel(logging.INFO)

    import alise.tools.lab.engine as eb
    from alise.worker.model.kv_cache import KVCache
    from alise.worker.model.loader import load_model
    from alise.worker.model.runner import ModelRunner

    eb.DECODE_BATCHES, eb.PREFILL_LENS, eb.CONTEXT = BATCHES, PREFILLS, CONTEXT
    card = eb.measure_card(args.device)
    # The worker's own loader: the preset with random weights, as `alise worker --model` builds it.
    loaded = load_model(args.preset, device=args.device,
                        dtype="float16" if args.device.startswith("cuda") else "float32")
    fig = eb.model_figures(loaded)
    # The blocks the steps use: the decode at the largest batch holds CONTEXT + 1 tokens a sequence
    # (OPT-13B: 64 x 33 blocks, 26 GiB), the longest prefill its prompt; --kv-gib asks for more.
    need = max(max(BATCHES) * -(-(CONTEXT + 1) // eb.BLOCK_SIZE), -(-max(PREFILLS) // eb.BLOCK_SIZE))
    budget = KVCache.num_blocks_for_budget(loaded.config, eb.BLOCK_SIZE, loaded.dtype, int(args.kv_gib * 2**30))
    num_blocks = max(need, budget)
    start = time.perf_counter()
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=eb.BLOCK_SIZE, max_num_seqs=72,
                         max_num_tokens=576, fast_kernels=args.device.startswith("cuda"))
    startup_s = time.perf_counter() - start
    torch.manual_seed(1)
    runner.kv_cache.key_cache.normal_()
    runner.kv_cache.value_cache.normal_()
    results = {f"prefill_{n}": {} for n in PREFILLS} | {f"decode_{b}": {} for b in BATCHES}
    eb.bench_engine(runner, results)
    steps = {key: row["engine_s"] for key, row in results.items()}
    return dict(engine="alise", startup_s=startup_s, steps_s=steps, card=card, figures=fig,
                decode_context=CONTEXT)


def run_vllm(args) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=args.model, tokenizer=args.model, load_format="dummy", dtype="float16", max_model_len=2048,
              max_num_seqs=64, max_num_batched_tokens=8192, block_size=16, num_gpu_blocks_override=4096,
              enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization, seed=0)
    startup_s = time.perf_counter() - start
    rng = random.Random(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def timed(num_seqs: int, prompt_len: int, max_tokens: int) -> float:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, vocab) for _ in range(prompt_len)])
                   for _ in range(num_seqs)]
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                                detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return seconds

    timed(4, 64, 8)  # warm-up
    steps = {}
    for n in PREFILLS:
        steps[f"prefill_{n}"] = statistics.median(timed(1, n, 1) for _ in range(args.reps + 2))
    first = CONTEXT - 64  # decoding from 448 to 576 between T(129) and T(257)
    for b in BATCHES:
        prompt = first - 128
        diffs = [(timed(b, prompt, 257) - timed(b, prompt, 129)) / 128 for _ in range(args.reps)]
        steps[f"decode_{b}"] = statistics.median(diffs)
    return dict(engine="vllm", version=vllm.__version__, startup_s=startup_s, steps_s=steps,
                decode_context=CONTEXT)


def floors(alise: dict) -> dict:
    card, fig = alise["card"], alise["figures"]
    bw, flops = card["copy_bytes_per_s"], card["matmul_flops_per_s"]["fp16"]
    out = {}
    for n in PREFILLS:
        out[f"prefill_{n}"] = (2 * n * fig["linear_params"] + 2 * n * n * fig["hidden"] * fig["layers"]
                               + 2 * fig["hidden"] * fig["vocab"]) / flops
    for b in BATCHES:
        out[f"decode_{b}"] = (fig["weight_bytes"] + b * CONTEXT * fig["kv_bytes_per_token"]) / bw
    return out


def table(runs: list[dict]) -> str:
    by = {r["engine"]: r for r in runs}
    alise, vllm = by.get("alise"), by.get("vllm")
    floor = floors(alise) if alise else {}
    lines = [f"{'step':<28}{'floor ms':>10}{'ALISE ms':>10}{'vLLM ms':>10}{'ALISE/vLLM':>12}"]
    for key in [f"prefill_{n}" for n in PREFILLS] + [f"decode_{b}" for b in BATCHES]:
        a = alise["steps_s"].get(key) if alise else None
        v = vllm["steps_s"].get(key) if vllm else None
        label = f"prefill {key[8:]} tokens" if key.startswith("prefill") else f"decode batch {key[7:]}, ctx {CONTEXT}"
        cell = lambda x: f"{x * 1e3:.2f}" if x else "-"  # noqa: E731
        ratio = f"{a / v:.2f}" if a and v else "-"
        lines.append(f"{label:<28}{cell(floor.get(key)):>10}{cell(a):>10}{cell(v):>10}{ratio:>12}")
    starts = ", ".join(f"{r['engine']} start-up {r['startup_s']:.0f} s" for r in runs)
    device = alise["card"]["device"] if alise else "?"
    return "\n".join(lines + [f"({device}; {starts})"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=("alise", "vllm"))
    p.add_argument("--json", default="")
    p.add_argument("--table", nargs="*", help="engine JSON files to print side by side")
    p.add_argument("--model", default=str(ROOT / ".peercarry" / "model"), help="vLLM: the model directory")
    p.add_argument("--preset", default="opt-13b", help="ALISE: the preset (tiny-opt for a CPU smoke run)")
    p.add_argument("--device", default="cuda", help="ALISE: cuda, or cpu for a smoke run")
    p.add_argument("--kv-gib", type=float, default=0.0,
                   help="ALISE: KV cache, at least the blocks the steps use (the default)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.table is not None:
        runs = [json.loads(Path(f).read_text()) for f in args.table if Path(f).exists()]
        print(table(runs))
        return 0
    if not args.engine:
        p.error("--engine or --table")
    result = (run_alise if args.engine == "alise" else run_vllm)(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["steps_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
