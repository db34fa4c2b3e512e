"""``alise predictor build|eval|serve``.

The ``alise`` CLI calls :func:`register` with its subparsers; ``python -m alise.predictor.cli``
runs the same commands standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from alise.common.security import add_security_arguments, security_from_args

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the ``predictor`` command (with build/eval/serve) to an argparse subparsers object.
    Each leaf sets ``func`` to its handler: call ``args.func(args)``."""
    parser = subparsers.add_parser("predictor", help="output-length predictor: build, eval, serve")
    sub = parser.add_subparsers(dest="predictor_command", required=True)

    build = sub.add_parser("build", help="build a persisted index from dataset files")
    build.add_argument("--data", action="append", required=True, help="dataset file (repeatable)")
    build.add_argument("--index-dir", required=True, help="directory of the persisted index")
    build.add_argument("--tokenizer", default=None,
                       help="HF tokenizer dir of the served model (default: the encoder's WordPiece one)")
    build.add_argument("--encoder", default=None,
                       help="sentence-transformers model dir (default: all-MiniLM-L6-v2, shipped by a package)")
    add_encoder_arguments(build)
    build.set_defaults(func=main_build)

    ev = sub.add_parser("eval", help="k-fold evaluation against the mean and 10-NN baselines")
    ev.add_argument("--data", action="append", required=True, help="dataset file (repeatable)")
    ev.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    ev.add_argument("--seed", type=int, default=0, help="seed of the fold split")
    ev.add_argument("--json", default=None, help="also write the table as JSON here (default: no)")
    ev.add_argument("--holdout-generator", action="append", default=[], metavar="NAME",
                    help="leave-one-generator-out: train on the other models' lengths, test on "
                         "NAME's (repeatable; 'all': every model in turn)")
    ev.add_argument("--tokenizer", default=None,
                    help="HF tokenizer dir of the served model (default: the encoder's WordPiece one)")
    ev.add_argument("--encoder", default=None,
                    help="sentence-transformers model dir (default: all-MiniLM-L6-v2, shipped by a package)")
    add_encoder_arguments(ev)
    ev.set_defaults(func=main_eval)

    serve = sub.add_parser("serve", help="run the PredictorService")
    serve.add_argument("--index-dir", default=None,
                       help="directory of the persisted index, loaded and snapshotted (default: in memory only)")
    serve.add_argument("--address", default="127.0.0.1:50053", help="listen address (port 0 = any free port)")
    serve.add_argument("--bootstrap", action="append", default=[],
                       help="dataset file for a cold start (repeatable)")
    serve.add_argument("--model", default="served", help="name of the served model")
    serve.add_argument("--tokenizer", default=None,
                       help="HF tokenizer dir of the served model (default: the encoder's WordPiece one)")
    serve.add_argument("--encoder", default=None,
                       help="sentence-transformers model dir (default: all-MiniLM-L6-v2, shipped by a package)")
    add_encoder_arguments(serve)
    serve.add_argument("--encoder-threads", type=int, default=None,
                       help="encoder threads, parallel shards of a batch (default: 2, or 1 on one core)")
    serve.add_argument("--refit-interval-s", type=float, default=60.0,
                       help="seconds between refits of the estimator on the grown history")
    serve.add_argument("--snapshot-interval-s", type=float, default=300.0,
                       help="seconds between snapshots of the index (the write-ahead log holds "
                            "every observation in between; default %(default)s)")
    serve.add_argument("--max-observations-per-s", type=float, default=2000.0,
                       help="most observations one Observe stream may send per second (default %(default)s)")
    serve.add_argument("--metrics-address", default="",
                       help="serve Prometheus metrics over HTTP here (default: none)")
    add_security_arguments(serve, client_api=False)
    serve.set_defaults(func=main_serve)
    return parser


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="tokens the encoder sees of a prompt (default: the model's limit)")
    parser.add_argument("--fp32", action="store_true",
                        help="fp32 encoder (default: int8, ONNX Runtime's dynamic quantization)")
    parser.add_argument("--encoder-layers", type=int, default=None, metavar="N",
                        help="transformer layers the encoder runs; the vector is the last one's mean "
                             "(default: all but the last, which measured better for length; the "
                             "model's depth gives sentence-transformers' own vectors)")


def make_encoder(args, **kwargs):
    from alise.predictor.encoder import Encoder

    return Encoder(args.encoder, max_seq_length=args.max_seq_length, int8=not args.fp32,
                   layers=args.encoder_layers, **kwargs)


def main_build(args) -> int:
    from alise.predictor.history import History
    from alise.predictor.index import VectorIndex
    from alise.predictor.startup import bootstrap_history, replay_log, restore_history
    from alise.predictor.snapshot import prepare_index_dir, save_snapshot
    from alise.predictor.wal import delete_segments_before, segment_numbers

    started = time.perf_counter()
    prepare_index_dir(args.index_dir)
    encoder = make_encoder(args)
    restored = restore_history(args.index_dir, encoder)  # a served index: its logged observations too
    if restored is not None:
        history, first = restored.history, restored.first_segment
    else:
        history, first = History(VectorIndex(encoder.dim)), 0
        replay_log(history, args.index_dir, first)
    n = bootstrap_history(history, encoder, args.data, args.tokenizer)
    segment = max([first, *[s + 1 for s in segment_numbers(args.index_dir)]])
    path = save_snapshot(history, args.index_dir, encoder.name, max_seq_length=encoder.max_seq_length,
                         wal_segment=segment)
    delete_segments_before(args.index_dir, segment)
    print(f"added {n} observations; index has {history.num_prompts} prompts, "
          f"{history.num_observations} observations ({history.index.index_type}); "
          f"snapshot {path} in {time.perf_counter() - started:.1f} s")
    return 0


def main_eval(args) -> int:
    from alise.predictor.datasets import load_records
    from alise.predictor.evaluate import build_corpus, evaluate, format_table
    from alise.predictor.tokens import TokenCounter

    started = time.perf_counter()
    records = [r for path in args.data for r in load_records(path)]
    encoder = make_encoder(args)
    corpus = build_corpus(records, encoder, TokenCounter(args.tokenizer))
    holdout = args.holdout_generator
    if "all" in holdout:
        holdout = sorted(set(corpus.obs_model))
    report = evaluate(corpus, num_folds=args.folds, seed=args.seed, holdout=holdout)
    print(format_table(report))
    avg = report["average"]
    mode = "leave-one-generator-out, " if holdout else ""
    print(f"\nALISE ({mode}cross-fitted): mean Kendall tau {avg['alise']['kendall_tau']:.3f} "
          f"(10-NN {avg['knn10']['kendall_tau']:.3f}); MAE {avg['alise']['mae_vs_mean'] - 1:+.1%} vs "
          f"the mean predictor (10-NN {avg['knn10']['mae_vs_mean'] - 1:+.1%}); "
          f"{len(corpus.texts)} prompts, {args.folds} folds, {time.perf_counter() - started:.0f} s; "
          f"encoder {encoder.name} (max_seq_length {encoder.max_seq_length})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


def main_serve(args) -> int:
    """Serves until SIGTERM (exit 0); a bad flag, index or data file: a message, exit 2."""
    from alise.common.entrypoint import bind_failure, refuse_taken_ports
    from alise.common.grpc_server import run_until_signal
    from alise.common.logs import configure_logging
    from alise.predictor.config import PredictorConfig
    from alise.predictor.service import start_predictor_server
    from alise.predictor.snapshot import SnapshotError

    configure_logging("predictor")

    async def run(config: PredictorConfig) -> None:
        server = await start_predictor_server(config)
        print(f"predictor listening on port {server.port}", flush=True)
        await run_until_signal(server.stop)

    try:
        config = PredictorConfig(
            address=args.address, index_dir=args.index_dir, bootstrap=tuple(args.bootstrap),
            model=args.model, tokenizer_path=args.tokenizer, encoder_path=args.encoder,
            refit_interval_s=args.refit_interval_s, snapshot_interval_s=args.snapshot_interval_s,
            max_observations_per_s=args.max_observations_per_s,
            metrics_address=args.metrics_address,
            encoder_max_seq_length=args.max_seq_length, encoder_int8=not args.fp32,
            encoder_layers=args.encoder_layers, num_threads=args.encoder_threads,
            security=security_from_args(args),
        )
        refusal = refuse_taken_ports("predictor", {"--address": config.address,
                                                   "--metrics-address": config.metrics_address})
        if refusal is None:
            asyncio.run(run(config))
    except (SnapshotError, ValueError, OSError) as exc:
        print(f"alise predictor serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:
        refusal = bind_failure("predictor", exc)
        if refusal is None:
            raise
    if refusal is not None:
        print(refusal, file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alise")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except Exception as exc:  # a readable one-liner for known start-up errors
        from alise.predictor.snapshot import SnapshotError

        if isinstance(exc, (SnapshotError, FileNotFoundError, ValueError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
