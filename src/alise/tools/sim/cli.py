"""`alise trace`, `alise sim`: build traces and simulate policies (`alise bench`, the replay against a
live cluster, is ``alise.tools.bench.cli``).

Building the parser imports nothing heavy; each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys

from alise.cli.arguments import output_path
from alise.tools.sim.flags import add_scheduling_flags


def register(sub) -> None:
    t = sub.add_parser("trace", help="build a request trace (prompts, lengths, arrivals) as JSONL")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--workload", choices=["alpaca", "chat", "multiturn"],
                     help="alpaca: AlpacaEval prompts, text_davinci_003 lengths; "
                          "chat: the same prompts, llama-2-70b-chat-hf lengths; "
                          "multiturn: conversations of AlpacaEval instructions and real answers, each "
                          "turn's prompt holding the conversation so far (--turns, --think-time-s)")
    src.add_argument("--data", metavar="FILE",
                     help="any data set file the predictor reads: AlpacaEval JSONL, alpaca_data.json "
                          "(a list of {instruction, input, output}), ShareGPT JSON (a list of {id, "
                          "conversations}), ShareGPT prompts JSONL ({id, prompt}: no outputs, so give "
                          "--output-len or --output-lens-from); gzip or not")
    lengths = t.add_mutually_exclusive_group()
    lengths.add_argument("--output-len", type=int, metavar="N",
                         help="with --data: every request generates N tokens (the data's outputs, if "
                              "any, are not used)")
    lengths.add_argument("--output-lens-from", metavar="FILE",
                         help="with --data: each prompt draws its output length (seeded by --seed) from "
                              "the outputs of FILE, e.g. ../shared/data/alpaca_eval/"
                              "llama-2-70b-chat-hf.jsonl.gz (the data's own outputs are not used)")
    t.add_argument("--out", required=True, type=output_path, help="trace JSONL to write")
    t.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second (default 1)")
    t.add_argument("--bursty", action="store_true", help="Gamma inter-arrivals, CV --cv")
    t.add_argument("--cv", type=float, default=3.0, help="CV of bursty gaps (default 3)")
    t.add_argument("--num", type=int, default=800, help="requests (default 800)")
    t.add_argument("--seed", type=int, default=0)
    from alise.tools.conversations import add_trace_arguments

    add_trace_arguments(t)
    t.set_defaults(func=_cmd_trace)

    s = sub.add_parser("sim", help="simulate policies over request rates (discrete-event, virtual time)")
    s.add_argument("--trace", action="append", required=True,
                   help="trace JSONL (repeat for several workloads)")
    s.add_argument("--policies", default="fcfs,alise,oracle",
                   help="comma-separated policies to sweep, each with the knobs below (default: %(default)s)")
    s.add_argument("--profile", default=None,
                   help="latency profile JSON (default: profiles/opt-13b-h100.json if present, "
                        "else the OPT-13B H100 roofline)")
    # The simulated workers' shape: SimConfig's defaults (an H100 serving OPT-13B), read when it
    # runs (the simulator imports numpy; building this parser does not).
    s.add_argument("--kv-tokens", type=int, default=None,
                   help="KV room per worker in tokens (default: SimConfig's, OPT-13B's on an H100)")
    s.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], default=None,
                   help="the workers' KV pages: fp8_e4m3 doubles the blocks and halves the profile's "
                        "per-context-token cost (default: SimConfig's, auto: 16 bits)")
    s.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="each worker's ranks: a one-device profile is priced for them, its weights, FLOPs and KV "
                        "split N ways, plus 2 all-reduces per layer (alise.tools.sim.profiles; default: 1)")
    s.add_argument("--tp-model", default=None,
                   help="the model whose shape prices the all-reduces (default: the profile's own model)")
    s.add_argument("--allreduce-us", type=float, default=10.0,
                   help="latency of one all-reduce, microseconds (default: %(default)s, assumed; "
                        "bench/gpu/tp_decode.py measures it)")
    s.add_argument("--allreduce-gb-s", type=float, default=100.0,
                   help="all-reduce bandwidth, GB/s (default: %(default)s, assumed)")
    s.add_argument("--workers", type=int, default=None, dest="num_workers",
                   help="simulated workers, all alike (default: SimConfig's, one)")
    s.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences in one step of a worker (default: SimConfig's, vLLM's)")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="the workers keep released full KV blocks for prompts that start with the same "
                        "tokens, a conversation's later turns here (default: SimConfig's, on)")
    s.add_argument("--rates", default=None,
                   help="comma-separated rates (req/s); default: 0.4..2.4 x estimated capacity")
    s.add_argument("--predictor", default="auto", choices=["auto", "predictor", "knn"],
                   help="where alise's cross-fitted estimates come from (default: %(default)s)")
    s.add_argument("--folds", type=int, default=5, help="cross-fitting folds of alise's estimates")
    s.add_argument("--json", dest="json_path", default=None, type=output_path,
                   help="write results as JSON (default: no JSON)")
    s.add_argument("--png", default=None, type=output_path, help="plot path (default: <json or trace>.png)")
    s.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show which policy and rate run and how far on stderr (default: on a terminal; "
                        "elsewhere one line per finished policy sweep)")
    add_scheduling_flags(s)
    s.set_defaults(func=_cmd_sim)


def _cmd_trace(args: argparse.Namespace) -> int:
    from alise.tools import conversations as conv
    from alise.tools import trace as tr

    def error(message: str):
        print(f"alise trace: {message}", file=sys.stderr)
        raise SystemExit(2)

    has_lengths = args.output_len is not None or args.output_lens_from
    if has_lengths and not args.data:
        error("--output-len and --output-lens-from go with --data (a --workload has its own lengths)")
    path, records, lengths = args.data, [], None
    try:
        conv.conversation_settings(args)
        tokenize = tr.default_tokenizer()
        system = conv.system_prompt_from_args(args, tokenize)
        if args.workload == "multiturn":
            requests, source = conv.multiturn_from_args(args, system, tokenize)
        else:
            path = tr.workload_path(args.workload) if args.workload else args.data
            records = tr.load_prompts(path)
            source = "the data's outputs"
            if args.output_len is not None:
                source, lengths = f"{args.output_len} tokens each", args.output_len
            elif args.output_lens_from:
                source = f"drawn from {args.output_lens_from}"
                lengths = tr.output_lengths_of(args.output_lens_from)
            requests = tr.build_trace(records, num=args.num, rate=args.rate, bursty=args.bursty, cv=args.cv,
                                      seed=args.seed, output_lengths=lengths)
            if system:
                requests = conv.with_system_prompt(requests, system, tokenize)
    except tr.MissingOutputsError:
        error(f"{path} has prompts but no outputs to take output lengths from: give --output-len N "
              "(every request N tokens) or --output-lens-from FILE (lengths drawn from another data "
              "set's outputs, e.g. ../shared/data/alpaca_eval/llama-2-70b-chat-hf.jsonl.gz)")
    except (ValueError, OSError) as exc:  # an unreadable or unrecognised file, a bad number
        error(str(exc))
    tr.write_trace(requests, args.out)
    stats = tr.describe(requests)
    left_out = sum(1 for r in records if r[2] is None) if lengths is None else 0
    print(f"wrote {len(requests)} requests to {args.out} "
          f"({f'Gamma CV {args.cv:g}' if args.bursty else 'Poisson'}, {stats['rate']:.2f} req/s over "
          f"{stats['span_s']:.1f} s; prompt mean {stats['prompt_mean']:.0f}, output mean "
          f"{stats['output_mean']:.0f} p50 {stats['output_p50']:.0f} p90 {stats['output_p90']:.0f} "
          f"tokens; output lengths: {source}"
          + (f"; {left_out} record{'s' * (left_out > 1)} without an output left out" if left_out else "")
          + ")")
    print(conv.prefix_line(requests, tokenize))
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from alise.tools.sim.report import run_sim_command

    return run_sim_command(args)
