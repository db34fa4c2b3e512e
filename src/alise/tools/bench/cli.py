"""`alise bench`: replay a trace open-loop against ALISE (gRPC) or any OpenAI-compatible server,
and report what ``vllm bench serve`` reports; or compare saved runs side by side.

Building the parser imports nothing heavy; the handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from alise.cli.arguments import output_path, positive_seconds

BACKENDS = ("grpc", "openai", "openai-chat")


def _rate(value: str) -> float:
    rate = float(value)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or inf, got {value}")
    return rate


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def register(sub) -> None:
    b = sub.add_parser("bench", help="replay a trace open-loop against a server (gRPC or OpenAI HTTP), "
                                     "or compare saved runs (--compare)")
    b.add_argument("--trace", help="trace JSONL (`alise trace`): prompts, output lengths, arrival times")
    b.add_argument("--num", type=_positive_int, default=None, help="first N requests only")
    arrivals = b.add_mutually_exclusive_group()
    arrivals.add_argument("--rate", type=_rate, default=None,
                          help="keep the trace's arrival pattern, rescaled to this mean rate (req/s)")
    arrivals.add_argument("--request-rate", type=_rate, default=None,
                          help="draw new arrivals at this rate (req/s; inf = all at once), "
                               "Poisson or Gamma (--burstiness); conversations start at this rate over "
                               "their turns, and a later turn is sent its think time after the answer "
                               "before it ended")
    b.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the inter-arrival gaps with --request-rate: 1 = Poisson, "
                        "< 1 burstier, > 1 more regular (default %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="seed of --request-rate arrivals (default %(default)s)")
    b.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight; the rest wait for a slot")
    b.add_argument("--backend", choices=BACKENDS, default="grpc",
                   help="grpc: ALISE's SDK at --address; openai / openai-chat: /v1/completions or "
                        "/v1/chat/completions at --base-url (default %(default)s)")
    b.add_argument("--address", default=os.environ.get("ALISE_ADDRESS", "127.0.0.1:50051"),
                   help="scheduler address for --backend grpc (default %(default)s)")
    b.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server URL for the openai backends (default %(default)s)")
    b.add_argument("--model", default=None, help="model name for the openai backends (default: /v1/models' first)")
    b.add_argument("--token", default=os.environ.get("ALISE_TOKEN"), help="bearer token (env ALISE_TOKEN)")
    b.add_argument("--lengths", choices=["oracle", "max-tokens"], default="oracle",
                   help="how each request is told its length (min(--max-tokens, its trace length)): "
                        "oracle = ALISE's oracle_output_tokens, with max_tokens = the common cap, so the "
                        "policy never sees the length; max-tokens = max_tokens set to the length, as "
                        "vLLM's benchmark does (for other servers) (default %(default)s)")
    b.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                   help="cap on each request's output: it generates min(N, its trace length) tokens "
                        "(default 2048, the simulator's cap)")
    b.add_argument("--timeout", type=positive_seconds, default=600.0, help="per-request deadline (s)")
    b.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:20000 (a request counts if it meets all)")
    b.add_argument("--label", default=None, help="name of this run in comparisons (default: the backend)")
    b.add_argument("--json", dest="json_path", default=None, type=output_path,
                   help="write the run (settings, figures, requests) here")
    b.add_argument("--out", default=None, type=output_path, help="write per-request results as JSONL here")
    b.add_argument("--compare", nargs="+", default=None, metavar="RUN.json",
                   help="print saved runs (--json files) side by side instead of running")
    b.add_argument("--png", default=None, type=output_path,
                   help="with --compare: latency CDFs of the runs, p50 and p99 marked")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show requests done, rate and elapsed time on stderr as the run goes (default: "
                        "on a terminal; elsewhere one line when the run ends)")
    b.set_defaults(func=_cmd_bench)


def _requests(args: argparse.Namespace):
    from alise.tools.trace import arrival_times, read_trace, rescale, with_start_times

    requests = read_trace(args.trace)
    if args.num:
        requests = requests[:args.num]
    if args.rate:
        return rescale(requests, args.rate)
    if args.request_rate is None:
        return requests
    # New arrivals for the requests on the clock; a conversation's later turns keep their think times.
    num_starts = sum(not r.is_follow_up for r in requests)
    if math.isinf(args.request_rate):
        times = [0.0] * num_starts
    else:
        rate = args.request_rate * num_starts / len(requests)  # so that requests come at --request-rate
        times = arrival_times(num_starts, rate, bursty=args.burstiness != 1.0,
                              cv=args.burstiness ** -0.5, seed=args.seed)
    return with_start_times(requests, times)


def _backend(args: argparse.Namespace):
    from alise.client.channel import check_address
    from alise.tools.bench.backends import GrpcBackend, OpenAIBackend

    if args.backend == "grpc":
        return GrpcBackend(check_address(args.address), token=args.token)
    return OpenAIBackend(args.base_url, chat=args.backend == "openai-chat", model=args.model, token=args.token)


def _validate(args: argparse.Namespace, parser_error) -> dict:
    from alise.tools.bench.metrics import parse_goodput

    if args.compare is None and not args.trace:
        parser_error("--trace is required (or --compare RUN.json ...)")
    if args.png and args.compare is None:
        parser_error("--png goes with --compare")
    if not args.burstiness > 0:
        parser_error(f"--burstiness must be > 0, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser_error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    try:
        return parse_goodput(args.goodput)
    except ValueError as exc:
        parser_error(str(exc))


def _cmd_bench(args: argparse.Namespace) -> int:
    def error(message: str):
        print(f"alise bench: {message}", file=sys.stderr)
        raise SystemExit(2)

    slo = _validate(args, error)
    if args.compare is not None:
        return _compare(args.compare, args.png, slo)
    return _run(args, slo)


def _run(args: argparse.Namespace, slo: dict) -> int:
    import asyncio
    from dataclasses import asdict

    from alise.tools.bench.backends import BenchError
    from alise.tools.bench.openloop import DEFAULT_MAX_TOKENS, format_summary, run_bench, summarize, write_results
    from alise.tools.sim.progress import ProgressLine

    try:
        requests = _requests(args)
        backend = _backend(args)
    except (ValueError, OSError) as exc:  # the trace (missing, unreadable, not a trace), the address
        print(f"alise bench: {exc}", file=sys.stderr)
        return 2
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS
    before = _prefill_counts(args)
    try:
        results = asyncio.run(run_bench(requests, backend, timeout_s=args.timeout, lengths=args.lengths,
                                        max_tokens=max_tokens, max_concurrency=args.max_concurrency,
                                        progress=ProgressLine.for_flag(args.progress)))
    except BenchError as exc:  # the server could not be reached to start the run
        print(f"alise bench: {exc}", file=sys.stderr)
        return 1
    summary = summarize(results, slo)
    after = _prefill_counts(args)
    if before is not None and after is not None:
        summary["prefill"] = dict(zip(("admitted_tokens", "cached_tokens", "computed_tokens"),
                                      (b - a for a, b in zip(before, after, strict=True)), strict=True))
    label = args.label or backend.name
    print(format_summary(summary, title=f"{label} -> {backend.target}"))
    if "prefill" in summary:
        print(format_prefill(summary["prefill"]))
    if args.out:
        write_results(results, args.out)
        print(f"per-request results: {args.out}")
    if args.json_path:
        settings = dict(label=label, backend=backend.name, target=backend.target, trace=args.trace,
                        num_requests=len(requests), rate=args.rate, request_rate=args.request_rate,
                        burstiness=args.burstiness, seed=args.seed, max_concurrency=args.max_concurrency,
                        lengths=args.lengths, max_tokens=max_tokens, date=time.strftime("%Y-%m-%d %H:%M:%S"))
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(dict(settings=settings, summary=summary, requests=[asdict(r) for r in results]), f)
        print(f"run written to {args.json_path}")
    failed = summary["num_failed"]
    if failed:
        print(f"{failed} requests failed; first: {next(r.error for r in results if r.error)}", file=sys.stderr)
    return 1 if failed else 0


def _prefill_counts(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """The scheduler's (admitted, cached, computed) prompt tokens since its start (the grpc
    backend: its status); None where the backend has no status to read, or it fails."""
    from alise.client import AliseError, Client

    if args.backend != "grpc":
        return None
    try:
        with Client(args.address, token=args.token) as client:
            s = client.status()
    except AliseError:
        return None
    return s.num_admitted_tokens, s.num_cached_tokens, s.num_prefill_tokens


def format_prefill(prefill: dict) -> str:
    """One line: how much of the run's prompts the prefix caches held (server-side counts)."""
    admitted, cached = prefill["admitted_tokens"], prefill["cached_tokens"]
    rate = cached / admitted if admitted else 0.0
    return (f"prefix cache (scheduler's counts over the run): {cached:,} of {admitted:,} admitted prompt "
            f"tokens cached, hit rate {rate:.1%}; prefill tokens computed {prefill['computed_tokens']:,}")


def _compare(paths: list[str], png: str | None, slo: dict) -> int:
    from alise.tools.bench.metrics import format_comparison, summarize
    from alise.tools.bench.openloop import read_results

    runs, summaries = {}, {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            label = saved["settings"]["label"]
            requests = read_results(saved["requests"])
        except OSError as exc:
            print(f"alise bench: {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            print(f"alise bench: {path} is not a run written by --json ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            return 2
        while label in runs:
            label += "'"
        runs[label] = requests
        summaries[label] = summarize(runs[label], slo or saved["summary"].get("goodput_slo_ms"))
    print(format_comparison(summaries))
    if png:
        from alise.tools.bench.plot import plot_cdfs

        plot_cdfs(runs, png, title=" vs ".join(runs))
        print(f"latency CDFs: {png}")
    return 0
