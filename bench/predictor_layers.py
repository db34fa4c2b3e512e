"""Which of the encoder's layers should the predictor's vectors come from? Prints a table.

    .venv/bin/python bench/predictor_layers.py [--layers 3,4,5,6] [--fp32] [--holdout-generator all]
                                               [--model-path DIR]

For each depth, the encoder as served (``Encoder(layers=N)``: the first N transformer layers
of all-MiniLM-L6-v2, mean-pooled and normalized, int8 unless ``--fp32``) embeds the AlpacaEval
prompts, and ``alise predictor eval``'s evaluation runs on those vectors: 5 folds split by
prompt, 12 generators, cross-fitted (or leave-one-generator-out with ``--holdout-generator``).
Depth 6 is sentence-transformers' own vector. Columns: mean Kendall tau, MAE against the
mean predictor, p90 coverage, the 10-NN baseline's tau on the same vectors, and the encoder's
time for all the prompts again (one thread).
"""

from __future__ import annotations

import argparse
import glob
import os
import time

DATA = sorted(glob.glob("/work/shared/data/alpaca_eval/*.jsonl.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="3,4,5,6", help="depths to compare, comma-separated")
    parser.add_argument("--fp32", action="store_true", help="fp32 encoders (default: int8, as served)")
    parser.add_argument("--holdout-generator", action="append", default=[], metavar="NAME",
                        help="leave-one-generator-out instead ('all': every model in turn)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--model-path", default=None,
                        help="a sentence-transformers directory in place of the shipped MiniLM (other weights)")
    args = parser.parse_args()

    from alise.predictor.datasets import load_records
    from alise.predictor.encoder import Encoder
    from alise.predictor.evaluate import build_corpus, evaluate
    from alise.predictor.tokens import TokenCounter

    records = [r for path in DATA for r in load_records(path)]
    counter = TokenCounter()
    models = sorted({r.model for r in records})
    holdout = models if "all" in args.holdout_generator else args.holdout_generator
    mode = "leave-one-generator-out" if holdout else "cross-fitted"
    print(f"{'layers':>6} {'encoder':<28} {'tau':>6} {'MAE vs mean':>11} {'p90 cov':>7} "
          f"{'10-NN tau':>9} {'encode s':>8}", flush=True)
    for layers in (int(x) for x in args.layers.split(",")):
        encoder = Encoder(args.model_path, layers=layers, int8=not args.fp32, num_threads=1)
        corpus = build_corpus(records, encoder, counter)
        started = time.perf_counter()
        encoder.encode(corpus.texts)
        encode_s = time.perf_counter() - started
        report = evaluate(corpus, num_folds=args.folds, holdout=holdout)
        a, knn = report["average"]["alise"], report["average"]["knn10"]
        print(f"{layers:>6} {encoder.name:<28} {a['kendall_tau']:6.3f} {(a['mae_vs_mean'] - 1) * 100:+10.1f}% "
              f"{a['p90_coverage']:7.3f} {knn['kendall_tau']:9.3f} {encode_s:8.1f}", flush=True)
    print(f"({mode}, {len(corpus.texts)} prompts, {len(models)} generators, {args.folds} folds; "
          f"load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
