"""What a conversation's context buys the length predictor, and the scheduler (simulated).

    .venv/bin/python bench/predictor_context.py [--seeds 0,1,2] [--num 800] [--answers-from all]
        [--system-prompt-tokens 0] [--texts prompt,query] [--prior-turns K] [--no-sim]
        [--out /tmp/predictor_context.json]

For each seed, a multi-turn trace from the builder of ``alise trace --workload multiturn``
(its defaults: 1-8 turns, think time 10 s, answers of all 12 AlpacaEval generators, one a
conversation; context within 2,048 tokens) and cross-fitted estimates of every request
(``alise.tools.sim.context_estimates``: folds of whole conversations, each fold's test requests
predicted in arrival order and observed after), reading either the rendered prompt (what the
scheduler sends today) or the latest user message (``PromptContext.query``), each alone and
with the earlier answers' lengths (``PromptContext.previous_output_tokens``). Prints Kendall
tau, MAE (also against predicting the training mean) and p90 coverage, over all requests and
over later turns, and ``k`` fitted by moments on all of each trace's conversations (the
estimator learns its own from the pairs it sees: ``context.py``).

Unless ``--no-sim``: the simulator on each trace (later turns released their think time after
the answer before ends) at ``--fraction`` of its capacity bound: fcfs, alise on each estimate,
oracle; mean normalized latency and alise/oracle. A simulation, labelled as one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from alise.tools.conversations import (
    TurnsDistribution,
    build_conversations,
    load_answers,
    prefix_share,
    system_prompt_text,
)
from alise.tools.sim.context_estimates import conversation_cross_fit, metrics
from alise.tools.sim.flags import add_scheduling_flags
from alise.tools.trace import conversations, default_tokenizer


def traces(args, tokenize):
    answers = load_answers(None if args.answers_from == "all" else args.answers_from.split(","))
    system = system_prompt_text(args.system_prompt_tokens, tokenize) if args.system_prompt_tokens else ""
    for seed in args.seeds:
        yield seed, build_conversations(answers, num=args.num, rate=1.0, turns=TurnsDistribution.parse("1-8"),
                                        think_time_s=10.0, seed=seed, system=system, tokenize=tokenize)


def accuracy(requests, args, encoder) -> dict:
    """Estimates and their figures, per text read and with or without the context."""
    from alise.predictor.context import fit_prior_turns

    later = [i for i, r in enumerate(requests) if r.turn > 0]
    ys = [r.output_tokens for r in requests]
    out = {"k_all": fit_prior_turns([[ys[i] for i in t] for t in conversations(requests).values()])}
    for text in args.texts:
        started = time.perf_counter()
        fit = conversation_cross_fit(requests, text=text, encoder=encoder, prior_turns=args.prior_turns)
        for name, est in (("alone", fit.plain), ("context", fit.with_context)):
            out[f"{text}+{name}"] = dict(all=metrics(est, requests), later=metrics(est, requests, later),
                                         estimates=est)
        out[f"{text}:k_folds"] = fit.prior_turns
        print(f"  cross-fit reading the {text}: {time.perf_counter() - started:.0f} s, k by fold "
              f"{', '.join(f'{k:.2f}' for k in fit.prior_turns)}", flush=True)
    # the mean predictor: each fold's training mean is about the trace's mean
    mean = statistics.fmean(ys)
    out["mean_mae"] = dict(all=statistics.fmean(abs(mean - y) for y in ys),
                           later=statistics.fmean(abs(mean - ys[i]) for i in later))
    return out


def print_accuracy(seed: int, acc: dict) -> None:
    print(f"{'estimate':<18} {'tau':>6} {'MAE':>7} {'vs mean':>8} {'p90cov':>7} | later turns: "
          f"{'tau':>6} {'MAE':>7} {'vs mean':>8} {'p90cov':>7}")
    for key, m in acc.items():
        if "+" not in key:
            continue
        cells = []
        for part in ("all", "later"):
            x = m[part]
            cells.append(f"{x['kendall_tau']:6.3f} {x['mae']:7.1f} {x['mae'] / acc['mean_mae'][part] - 1:+7.1%} "
                         f"{x['p90_coverage']:7.3f}")
        print(f"{key:<18} {cells[0]} | {'':>12} {cells[1]}")
    print(f"seed {seed}: k fitted on all conversations {acc['k_all']:.2f}", flush=True)


def simulate(requests, acc: dict, args) -> dict:
    from alise.tools.sim.flags import scheduling_from_args
    from alise.tools.sim.report import load_profile
    from alise.tools.sim.simulator import SimConfig
    from alise.tools.sim.sweep import capacity_bound, sweep

    latency = load_profile(args.profile)
    config = SimConfig(scheduling=scheduling_from_args(args))
    bound = capacity_bound(requests, latency, config)
    rate = round(args.fraction * bound, 3)
    ms = {s.policy: s.mean_normalized_latency_s * 1000
          for s in sweep(requests, ("fcfs", "oracle"), [rate], latency, config, jobs=2)}
    for key in [k for k in acc if "+" in k]:
        est = dict(enumerate(acc[key]["estimates"]))
        [run] = sweep(requests, ("alise",), [rate], latency, config, estimates=est, jobs=1)
        ms[f"alise {key}"] = run.mean_normalized_latency_s * 1000
    print(f"SIMULATED ({args.profile}, kv_tokens {config.kv_tokens}, prefill step ratio "
          f"{config.scheduling.prefill_step_ratio:g}): bound {bound:.2f} req/s, rate {rate:.2f}; "
          "mean normalized "
          "latency ms/token, x oracle")
    for name, value in ms.items():
        print(f"  {name:<26} {value:8.2f}  {value / ms['oracle']:6.3f}x", flush=True)
    return dict(bound=bound, rate=rate, ms=ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--num", type=int, default=800)
    parser.add_argument("--answers-from", default="all", help="generators, comma-separated, or all")
    parser.add_argument("--system-prompt-tokens", type=int, default=0)
    parser.add_argument("--texts", default="prompt,query", type=lambda s: s.split(","))
    parser.add_argument("--prior-turns", type=float, default=None, metavar="K",
                        help="the shift's k for every fold (default: learned as the service learns it, "
                             "from the training requests' pairs)")
    parser.add_argument("--no-sim", action="store_true")
    parser.add_argument("--profile", default="profiles/opt-13b-h200-served.json")
    parser.add_argument("--fraction", type=float, default=0.9, help="of the capacity bound")
    parser.add_argument("--out", default="/tmp/predictor_context.json")
    add_scheduling_flags(parser)
    # Uncapped chunks beside decodes, unlike the scheduler: docs/predictor.md says why.
    parser.set_defaults(prefill_step_ratio=0.0)
    args = parser.parse_args()
    from alise.predictor.encoder import Encoder

    tokenize = default_tokenizer()
    encoder = Encoder()
    rows = []
    for seed, requests in traces(args, tokenize):
        share = prefix_share(tokenize([r.prompt for r in requests]))
        print(f"seed {seed}: {len(requests)} requests, {len(conversations(requests))} conversations, "
              f"prefix share {share.fraction:.1%}", flush=True)
        acc = accuracy(requests, args, encoder)
        print_accuracy(seed, acc)
        sim = None if args.no_sim else simulate(requests, acc, args)
        rows.append(dict(seed=seed, prefix_share=share.fraction, k_all=acc["k_all"], sim=sim,
                         accuracy={k: {p: v[p] for p in ("all", "later")} for k, v in acc.items() if "+" in k},
                         mean_mae=acc["mean_mae"]))
    keys = list(rows[0]["accuracy"])
    print("\nmean over seeds:")
    for key in keys:
        tau = statistics.fmean(r["accuracy"][key]["all"]["kendall_tau"] for r in rows)
        later = statistics.fmean(r["accuracy"][key]["later"]["kendall_tau"] for r in rows)
        mae = statistics.fmean(r["accuracy"][key]["all"]["mae"] / r["mean_mae"]["all"] - 1 for r in rows)
        line = f"  {key:<18} tau {tau:.3f} (later turns {later:.3f}), MAE {mae:+.1%} vs mean"
        if rows[0]["sim"]:
            ratio = statistics.fmean(r['sim']['ms']['alise ' + key] / r['sim']['ms']['oracle'] for r in rows)
            line += f", alise/oracle {ratio:.3f}x"
        print(line)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
