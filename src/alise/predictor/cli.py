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

from alise.cli.arguments import output_path
from alise.common.entrypoint import ConfigFlag, add_config_flags, build_config, config_flags, config_values
from alise.common.security import add_security_arguments, security_from_args
from alise.predictor.config import PredictorConfig

logger = logging.getLogger(__name__)


#: The encoder's flags, shared by build, eval and serve (fields of PredictorConfig).
ENCODER_FIELDS = ("encoder_path", "tokenizer_path", "encoder_max_seq_length", "encoder_int8",
                  "encoder_layers")
_RENAMED = (
    ConfigFlag("encoder_path", name="encoder", metavar="DIR"),
    ConfigFlag("tokenizer_path", name="tokenizer", metavar="DIR"),
    ConfigFlag("encoder_max_seq_length", name="max-seq-length", metavar="TOKENS"),
    ConfigFlag("encoder_int8", name="fp32"),
    ConfigFlag("encoder_layers", metavar="N"),
    ConfigFlag("num_threads", name="encoder-threads", metavar="N"),
)
#: `alise predictor serve`: a flag for each field of PredictorConfig (the estimator's
#: hyper-parameters are not flags; security comes from files and env).
SERVE_FLAGS = config_flags(PredictorConfig, *_RENAMED, exclude=("estimator", "security"))
ENCODER_FLAGS = tuple(f for f in SERVE_FLAGS if f.field in ENCODER_FIELDS)


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the ``predictor`` command (with build/eval/serve) to an argparse subparsers object.
    Each leaf sets ``func`` to its handler: call ``args.func(args)``."""
    parser = subparsers.add_parser("predictor", help="output-length predictor: build, eval, serve")
    sub = parser.add_subparsers(dest="predictor_command", required=True)

    build = sub.add_parser("build", help="build a persisted index from dataset files")
    build.add_argument("--data", action="append", required=True, help="dataset file (repeatable)")
    build.add_argument("--index-dir", required=True, help="directory of the persisted index")
    add_config_flags(build, PredictorConfig, ENCODER_FLAGS)
    build.set_defaults(func=_clear_errors(main_build, "build"))

    ev = sub.add_parser("eval", help="k-fold evaluation against the mean and 10-NN baselines")
    ev.add_argument("--data", action="append", required=True, help="dataset file (repeatable)")
    ev.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    ev.add_argument("--seed", type=int, default=0, help="seed of the fold split")
    ev.add_argument("--json", default=None, type=output_path, help="also write the table as JSON here (default: no)")
    ev.add_argument("--holdout-generator", action="append", default=[], metavar="NAME",
                    help="leave-one-generator-out: train on the other models' lengths, test on "
                         "NAME's (repeatable; 'all': every model in turn)")
    add_config_flags(ev, PredictorConfig, ENCODER_FLAGS)
    ev.set_defaults(func=_clear_errors(main_eval, "eval"))

    serve = sub.add_parser("serve", help="run the PredictorService")
    add_config_flags(serve, PredictorConfig, SERVE_FLAGS)
    add_security_arguments(serve, client_api=False)
    serve.set_defaults(func=main_serve)
    return parser


def make_encoder(args, **kwargs):
    from alise.predictor.encoder import Encoder

    return Encoder(args.encoder_path, max_seq_length=args.encoder_max_seq_length, int8=args.encoder_int8,
                   layers=args.encoder_layers, **kwargs)


def _clear_errors(command, name: str):
    """``command``, with its known errors (a data file missing or unreadable, a bad snapshot)
    printed in one line, exit 2, however it is reached (``alise predictor NAME``)."""

    def run(args) -> int:
        from alise.predictor.snapshot import SnapshotError

        try:
            return command(args)
        except (SnapshotError, OSError, ValueError) as exc:
            print(f"alise predictor {name}: error: {exc}", file=sys.stderr)
            return 2
    return run


def main_build(args) -> int:
    from alise.predictor.history import History
    from alise.predictor.index import VectorIndex
    from alise.predictor.snapshot import prepare_index_dir, save_snapshot
    from alise.predictor.startup import bootstrap_history, replay_log, restore_history
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
    n = bootstrap_history(history, encoder, args.data, args.tokenizer_path)
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
    corpus = build_corpus(records, encoder, TokenCounter(args.tokenizer_path))
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
    from alise.common.grpc_server import run_until_signal, stop_on_signals
    from alise.common.logs import configure_logging
    from alise.predictor.service import start_predictor_server
    from alise.predictor.snapshot import SnapshotError

    configure_logging("predictor")

    async def run(config: PredictorConfig) -> None:
        stop = stop_on_signals()  # before the start: a SIGTERM while it starts drains, never kills
        server = await start_predictor_server(config)
        print(f"predictor listening on port {server.port}", flush=True)
        await run_until_signal(server.stop, stop)

    try:
        config = build_config(PredictorConfig, config_values(args, SERVE_FLAGS),
                              security=security_from_args(args))
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
