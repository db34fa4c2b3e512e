"""Data for the GPU serving runs, split so the predictor never saw a trace prompt.

AlpacaEval prompt ids are split by ``id % 5``: ids with remainder 0, 1, 2 (483 prompts) are
the predictor's history, all 12 models' outputs included; ids with remainder 3, 4 (322
prompts) make the trace, each prompt once, with llama-2-70b-chat-hf's output lengths (the
`chat` workload) in the MiniLM tokenizer and Poisson arrivals.

    python bench/gpu/prep_serving.py --out .devcarry/serving --rate 4 --max-model-len 2048

``--generator NAME --bursty --cv 3 --name bursty`` writes another trace of the same prompts
(``bursty.jsonl``) with NAME's output lengths and Gamma arrivals of that coefficient of
variation: a workload a profile fitted on the ``chat`` runs has not seen.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

from alise.tools.trace import TraceRequest, arrival_times, default_counter, write_trace

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_eval"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generator", default="llama-2-70b-chat-hf", help="whose output lengths the trace has")
    p.add_argument("--bursty", action="store_true", help="Gamma arrivals (else Poisson)")
    p.add_argument("--cv", type=float, default=3.0, help="coefficient of variation of the Gamma gaps")
    p.add_argument("--name", default="trace", help="the trace's file name (without .jsonl)")
    args = p.parse_args()
    out = Path(args.out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    test_rows = []
    for path in sorted(DATA.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f]
        with gzip.open(out / "train" / path.name, "wt") as f:
            for row in rows:
                if row["id"] % 5 < 3:
                    f.write(json.dumps(row) + "\n")
        if path.name.startswith(args.generator + ".jsonl"):
            test_rows = [r for r in rows if r["id"] % 5 >= 3]
    count = default_counter()
    prompt_lens = count([r["instruction"] for r in test_rows])
    output_lens = count([r["output"] for r in test_rows])
    order = list(range(len(test_rows)))
    random.Random(args.seed).shuffle(order)
    times = arrival_times(len(order), args.rate, bursty=args.bursty, cv=args.cv, seed=args.seed + 1)
    trace = []
    for i, t in zip(order, times, strict=True):
        prompt_tokens = max(prompt_lens[i], 1)
        room = args.max_model_len - prompt_tokens - 1
        trace.append(TraceRequest(str(test_rows[i]["id"]), test_rows[i]["instruction"], prompt_tokens,
                                  max(min(output_lens[i], room), 1), round(t, 6)))
    write_trace(trace, out / f"{args.name}.jsonl")
    outs = sorted(r.output_tokens for r in trace)
    print(f"{len(trace)} trace requests at {args.rate} req/s; output tokens mean "
          f"{sum(outs) / len(outs):.0f}, p50 {outs[len(outs) // 2]}, max {outs[-1]}; "
          f"history: {len(list((out / 'train').glob('*.jsonl.gz')))} files")


if __name__ == "__main__":
    main()
