"""The side-by-side tables of bench/gpu/peer_vllm.sh, from what its runs wrote.

For each run NAME (``<server>-<setup>-r<rate>``, e.g. ``vllm-mem-r11``, ``fcfs-mem-rinf``; a run with
another client seed than the default ends in ``-s<seed>``, e.g. ``fcfs-mem-rinf-s3``) it reads
``DIR/results/NAME.json`` (``vllm bench serve --save-result --save-detailed``), and where present
``DIR/watch/NAME.json`` (bench/gpu/peer_watch.py: the server's metrics during the run) and
``DIR/steps/NAME.jsonl`` (an ALISE worker's step log). It prints, per run:

* vLLM's client figures: completed/failed, output tok/s, goodput (the SLOs the run was given),
  TTFT, TPOT, ITL and E2EL (mean, p50, p90, p99, ms), as the client computed them;
* normalized latency (E2EL / output tokens, ms per token; mean, p50, p90, p99), from the
  per-request results, percentiles as the client takes them (numpy, linear);
* events per token: the stream events that carried a choice (1 + the request's ITL entries)
  over its output tokens; 1.00 means one event per token, less means tokens came in fewer,
  later events (or in none: a server that sends no event for a token without text);
* from the server: the running and waiting requests averaged over the run's samples (and the
  most waiting), preemptions, engine steps and the mean step time (span / steps) where known,
  the prompt tokens it computed (recomputes after preemption included) and, for vLLM, the
  tokens its prefix cache served (a preempted request's blocks stay cached until reused);
  the server's own mean TTFT and queue time; the CPU each serving process spent per token.

Last, the comparison: each ALISE run against vLLM's run of the same setup and rate, as ratios
(ALISE / vLLM) of what the goals name, each marked ``ok`` or ``MISS`` against its goal
(``GOALS``: fcfs at least level with vLLM; the alise policy well ahead of it). All at once, where
both servers ran several client seeds (several request orders), a last line compares the means
over the seeds both ran: one all-at-once run is one draw of the order the longest jobs start in.

Writes ``DIR/summary.json`` (the table's numbers) and prints the tables, the comparison last.

    python bench/gpu/peer_table.py DIR [--runs NAME ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

STATS = ("mean", "p50", "p90", "p99")


def stats(values) -> dict[str, float]:
    a = np.asarray(list(values), dtype=float)
    if not len(a):
        return {k: float("nan") for k in STATS}
    return dict(mean=float(a.mean()), p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                p99=float(np.percentile(a, 99)))


def client_figures(res: dict) -> dict:
    """What the client printed, and what follows from its per-request lists."""
    row = dict(completed=res["completed"], failed=res.get("failed", 0), duration_s=res["duration"],
               total_output_tokens=res.get("total_output_tokens"),
               output_tok_s=res["output_throughput"], goodput=res.get("request_goodput"),
               rate=res.get("request_rate"), burstiness=res.get("burstiness"))
    for metric in ("ttft", "tpot", "itl", "e2el"):
        row[metric] = {k: res.get(f"{'median' if k == 'p50' else k}_{metric}_ms", res.get(f"{k}_{metric}_ms"))
                       for k in STATS}
    ok = [i for i, e in enumerate(res.get("errors") or []) if not e]
    ttfts, itls, lens = res.get("ttfts"), res.get("itls"), res.get("output_lens")
    if ttfts and itls and lens:
        e2e = {i: ttfts[i] + sum(itls[i]) for i in ok if lens[i]}
        row["norm_ms"] = stats(1e3 * e2e[i] / lens[i] for i in e2e)
        events, tokens = sum(1 + len(itls[i]) for i in e2e), sum(lens[i] for i in e2e)
        row["events_per_token"] = events / tokens if tokens else float("nan")
        row["tpot_from_events_ms"] = stats(1e3 * sum(itls[i]) / (lens[i] - 1) for i in e2e if lens[i] > 1)
    return row


def server_figures(watch: dict | None, steps: Path | None, duration_s: float) -> dict:
    out: dict = {}
    if watch and watch.get("times"):
        def series(prefix: str, label: str = ""):
            keys = [k for k in watch["series"] if k.startswith(prefix) and label in k]
            if not keys:
                return None
            return [sum(watch["series"][k][i] or 0.0 for k in keys) for i in range(len(watch["times"]))]

        def delta(prefix: str) -> float | None:
            keys = [k for k in watch["last"] if k.startswith(prefix)]
            if not keys:
                return None
            return sum(watch["last"][k] - watch["first"].get(k, 0.0) for k in keys)

        running = series("vllm:num_requests_running") or series("alise_jobs", 'state="running"')
        waiting = series("vllm:num_requests_waiting") or series("alise_queue_waiting")
        if running:
            out["running_mean"] = float(np.mean(running))
        if waiting:
            out["waiting_mean"], out["waiting_max"] = float(np.mean(waiting)), float(np.max(waiting))
        if any(k.startswith("vllm:num_preemptions") for k in watch["last"]):
            out["preemptions"] = delta("vllm:num_preemptions")
        elif any(k.startswith("alise_") for k in watch["last"]):  # no series until the first preemption
            out["preemptions"] = delta("alise_preemptions") or 0.0
        for key, prefix in (("server_ttft_ms", "vllm:time_to_first_token_seconds"),
                            ("server_ttft_ms", "alise_ttft_seconds"), ("queue_ms", "vllm:request_queue_time_seconds")):
            total, count = delta(prefix + "_sum"), delta(prefix + "_count")
            if total is not None and count:
                out[key] = 1e3 * total / count
        fed, made = delta("vllm:iteration_tokens_total_sum"), delta("vllm:generation_tokens_total")
        if fed is not None and made is not None:  # prompt tokens computed, recomputes included
            out["prefill_tokens"] = fed - made
            out["cache_hit_tokens"] = delta("vllm:prefix_cache_hits_total")
        n = delta("vllm:iteration_tokens_total_count")
        if n is None:
            n = delta("alise_step_seconds_count")
        if n:
            out["steps"] = n
            out["step_ms"] = 1e3 * duration_s / n
    if watch and watch.get("cpu"):
        cpu: dict[str, float] = {}
        first_pid = min(q["pid"] for q in watch["cpu"])
        for proc in watch["cpu"]:
            label = process_label(proc["cmd"], proc["pid"] == first_pid)
            cpu[label] = cpu.get(label, 0.0) + proc["cpu_s"]
        out["cpu_s"] = cpu
    if steps is not None and steps.exists():
        rows = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
        if rows:
            span = rows[-1]["end_s"] - (rows[0]["end_s"] - rows[0]["seconds"])
            out.update(steps=len(rows), step_ms=1e3 * float(np.mean([r["seconds"] for r in rows])),
                       busy=sum(r["seconds"] for r in rows) / span if span > 0 else None,
                       batch_mean=float(np.mean([r["num_seqs"] for r in rows])),
                       prefill_tokens=sum(sum(r["prefill_lens"]) for r in rows),
                       mixed_steps=sum(1 for r in rows if r["prefill_lens"]))
    return out


def process_label(cmd: str, first: bool) -> str:
    """A serving process's role from its command line."""
    for word, label in (("alise.cli.main http", "door"), ("alise.cli.main scheduler", "scheduler"),
                        ("alise.cli.main worker", "worker"), ("alise.cli.main predictor", "predictor"),
                        ("vllm.entrypoints.cli.main serve", "vllm api server")):
        if word in cmd:
            return label
    return "vllm engine core" if "multiprocessing" in cmd or "spawn" in cmd else ("server" if first else "other")


def fmt(x, digits=0) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:,.{digits}f}"


def tables(rows: list[dict]) -> str:
    w = max([len(r["name"]) for r in rows] + [4])
    head = f"{'run':<{w}}"
    lines = ["", f"{head} {'done':>7} {'out tok/s':>9} {'goodput':>8}  TTFT ms mean / p50 / p90 / p99"]
    for r in rows:
        t = r["ttft"]
        lines.append(f"{r['name']:<{w}} {r['completed']:>4}/{r['failed']:<2} {fmt(r['output_tok_s']):>9} "
                     f"{fmt(r['goodput'], 2):>8}  {' / '.join(fmt(t[k]) for k in STATS)}")
    lines += ["", f"{head}  TPOT ms mean / p50 / p90 / p99        ITL ms mean / p50 / p90 / p99      events/token"]
    for r in rows:
        tp, it = r["tpot"], r["itl"]
        lines.append(f"{r['name']:<{w}}  {' / '.join(fmt(tp[k], 1) for k in STATS):<34} "
                     f"{' / '.join(fmt(it[k], 1) for k in STATS):<34} {fmt(r.get('events_per_token'), 2)}")
    lines += ["", f"{head}  E2EL ms mean / p50 / p90 / p99          normalized ms/token mean / p50 / p90 / p99"]
    for r in rows:
        e, n = r["e2el"], r.get("norm_ms", {})
        lines.append(f"{r['name']:<{w}}  {' / '.join(fmt(e[k]) for k in STATS):<38} "
                     f"{' / '.join(fmt(n.get(k), 1) for k in STATS)}")
    lines += ["", f"{head}  running mean  waiting mean / max  preemptions  steps  step ms  busy  batch"
                  f"  server TTFT / queue ms mean  prompt tokens computed / from cache"]
    for r in rows:
        s = r["server"]
        lines.append(f"{r['name']:<{w}}  {fmt(s.get('running_mean'), 1):>12}  "
                     f"{fmt(s.get('waiting_mean'), 1):>8} / {fmt(s.get('waiting_max')):<5}  "
                     f"{fmt(s.get('preemptions')):>11}  {fmt(s.get('steps')):>5}  {fmt(s.get('step_ms'), 1):>7}  "
                     f"{fmt(s.get('busy'), 3):>4}  {fmt(s.get('batch_mean'), 1):>5}"
                     f"  {fmt(s.get('server_ttft_ms')):>9} / {fmt(s.get('queue_ms')):<14}"
                     f"  {fmt(s.get('prefill_tokens'))} / {fmt(s.get('cache_hit_tokens'))}")
    lines += ["", f"{head}  CPU ms per output token (cores busy) of each serving process"]
    for r in rows:
        cpu, tokens, span = r["server"].get("cpu_s") or {}, r.get("total_output_tokens") or 0, r["duration_s"]
        cells = [f"{k} {1e3 * v / tokens:.3f} ({v / span:.2f})" for k, v in sorted(cpu.items()) if tokens and span]
        lines.append(f"{r['name']:<{w}}  {'; '.join(cells) or '-'}")
    return "\n".join(lines)


SERVERS = ("vllm", "fcfs", "alise", "oracle")

#: policy -> (label, how to read it from a row, "<=" or ">=", the bound on ALISE / vLLM); the
#: rate of all at once is judged on throughput alone (its TTFT is the backlog of the whole trace).
GOALS = {
    "fcfs": [("TTFT p90", lambda r: r["ttft"]["p90"], "<=", 1.0),
             ("ITL p99", lambda r: r["itl"]["p99"], "<=", 1.0),
             ("goodput", lambda r: r["goodput"], ">=", 1.0)],
    "alise": [("TTFT p90", lambda r: r["ttft"]["p90"], "<=", 0.25),
              ("norm mean", lambda r: r.get("norm_ms", {}).get("mean"), "<=", 0.7),
              ("norm p99", lambda r: r.get("norm_ms", {}).get("p99"), "<=", 0.3),
              ("goodput", lambda r: r["goodput"], ">=", 1.5)],
}
THROUGHPUT_GOAL = ("out tok/s", lambda r: r["output_tok_s"], ">=", 1.0)


def judged(label: str, mine, theirs, op: str, bound: float) -> str:
    if mine is None or not theirs:
        return f"{label} -"
    ratio = mine / theirs
    ok = ratio <= bound if op == "<=" else ratio >= bound
    digits = 2 if label == "goodput" else 0
    return (f"{label} {fmt(mine, digits)} / {fmt(theirs, digits)} = {ratio:.2f}x [{op}{bound:g}] "
            f"{'ok' if ok else 'MISS'}")


def parse_name(name: str) -> tuple[str, str, str, str]:
    """``<server>-<setup>-r<rate>[-s<seed>]`` -> (server, setup, rate, seed); seed "" for the default."""
    server, _, rest = name.partition("-")
    head, sep, seed = rest.rpartition("-s")
    if not sep or not seed.isdigit() or "-r" not in head:
        head, seed = rest, ""
    setup, _, rate = head.rpartition("-r")
    return server, setup, rate, seed


def comparison(rows: list[dict]) -> str:
    """Each ALISE run beside vLLM's of the same setup, rate and seed: ALISE / vLLM per goal; all at
    once over several seeds, the means over the seeds both servers ran."""
    by_name = {r["name"]: r for r in rows}
    lines = ["", "ALISE / vLLM, the same setup and rate (ms, req/s, tok/s; the goal in brackets)"]
    seeds: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for r in rows:
        server, _, rest = r["name"].partition("-")
        peer = by_name.get(f"vllm-{rest}")
        if server == "vllm" or peer is None:
            continue
        _, setup, rate, _ = parse_name(r["name"])
        if rate == "inf":
            seeds.setdefault((server, setup), []).append((r, peer))
        goals = [THROUGHPUT_GOAL] if rate == "inf" else GOALS.get(server, GOALS["fcfs"])
        lines.append(f"{r['name']:<18} " + "; ".join(judged(label, read(r), read(peer), op, bound)
                                                      for label, read, op, bound in goals))
    label, read, op, bound = THROUGHPUT_GOAL
    for (server, setup), pairs in seeds.items():
        if len(pairs) > 1:
            mine = float(np.mean([read(r) for r, _ in pairs]))
            theirs = float(np.mean([read(p) for _, p in pairs]))
            lines.append(f"{server}-{setup}-rinf, mean of {len(pairs)} seeds: "
                         + judged(label, mine, theirs, op, bound))
    return "\n".join(lines) if len(lines) > 2 else ""


def run_order(name: str) -> tuple:
    """``<server>-<setup>-r<rate>[-s<seed>]`` by setup, rate (all at once last), seed, then vLLM,
    fcfs, alise."""
    server, setup, rate, seed = parse_name(name)
    try:
        rate_key = float(rate)
    except ValueError:
        rate_key = float("inf")
    return setup, rate_key, int(seed or -1), SERVERS.index(server) if server in SERVERS else len(SERVERS), name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--runs", nargs="*", help="run names in table order (default: every result, by name)")
    args = p.parse_args()
    root = Path(args.dir)
    names = args.runs or sorted((f.stem for f in (root / "results").glob("*.json")), key=run_order)
    rows = []
    for name in names:
        path = root / "results" / f"{name}.json"
        if not path.exists():
            print(f"{name}: no result (the run did not finish)")
            continue
        row = dict(name=name, **client_figures(json.loads(path.read_text())))
        watch_path = root / "watch" / f"{name}.json"
        watch = json.loads(watch_path.read_text()) if watch_path.exists() else None
        row["server"] = server_figures(watch, root / "steps" / f"{name}.jsonl", row["duration_s"])
        rows.append(row)
    (root / "summary.json").write_text(json.dumps(rows, indent=1))
    if rows:
        print(tables(rows))
        print(comparison(rows) or "\nno vLLM run beside an ALISE run of the same setup and rate: no comparison")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
