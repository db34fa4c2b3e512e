#!/usr/bin/env python3
"""Where ALISE's first tokens went in a side-by-side run, request by request (CPU, after the run).

    tar -xzf $OUT/peer-results.tgz -C /tmp/peer
    python bench/gpu/peer_ttft.py --results /tmp/peer --run fcfs-mem-r11 --peer vllm-mem-r11

Inputs (all written by bench/gpu/peer_vllm.sh): the client's per-request results of both
servers (``results/<run>.json``, same trace and arrival order), ALISE's scheduler log (the
``queued:`` line of each job: its arrival, prompt tokens and max_tokens), its job log (server
TTFT, preemptions) and the worker's step log (``steps/<run>.jsonl``: each step's start, end and
the prompt chunks it fed). A request is matched to its job by (prompt tokens, max_tokens) in
arrival order, and to the step that fed its prompt's first chunk (the first step starting after
its arrival with a fresh chunk of its length). The scheduler's clock is aligned to the client's
by the smallest arrival gap (the door takes at least a couple of milliseconds).

Printed: the mean / p50 / p90 / p99 ms of each leg (client to scheduler, arrival to its first
step's start, its prefill steps, report to scheduler, scheduler to client, client TTFT) and of
the steps that ran ahead of its prefill; then the requests in three groups (started within three
steps of arriving; arrived while the KV was nearly full; the rest) with ALISE's and the peer's
mean TTFT for the same requests and each group's share of the difference of the means.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import re
from pathlib import Path

import numpy as np

QUEUED = re.compile(r"(\S+ \S+) INFO scheduler alise\.scheduler\.service \[(\w+)\]: queued: (\d+) prompt tokens, "
                    r"max_tokens (\d+)")


def client_rows(path: Path) -> list[dict]:
    d = json.loads(path.read_text())
    return [dict(index=n, start=s, ttft=t, inp=i, out=o) for n, (s, t, i, o) in
            enumerate(zip(d["start_times"], d["ttfts"], d["input_lens"], d["output_lens"], strict=True))]


def queued_jobs(results: Path, setup: str, count: int, nth: int) -> list[tuple[float, str, int, int]]:
    """(wall time, job id, prompt tokens, max_tokens) of the set-up's ``nth`` run's jobs (from 0),
    in arrival order (the scheduler log holds every run of the set-up, one after another)."""
    rows = []
    for line in (results / "logs" / f"{setup}-scheduler.log").open():
        m = QUEUED.match(line)
        if m:
            wall = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rows.append((wall, m.group(2), int(m.group(3)), int(m.group(4))))
    rows.sort()
    return rows[nth * count:(nth + 1) * count]


def match(client: list[dict], queued: list[tuple[float, str, int, int]], jobs: dict) -> list[dict]:
    """Each request with its job, greedily by (prompt tokens, max_tokens) in arrival order."""
    used, out = set(), []
    for r in sorted(client, key=lambda r: r["start"]):
        for wall, job_id, prompt, max_tokens in queued:
            if job_id not in used and (prompt, max_tokens) == (r["inp"], r["out"]):
                used.add(job_id)
                out.append(dict(r, job=job_id, wall=wall, prompt=prompt, server_ttft=jobs[job_id]["ttft_s"],
                                preemptions=jobs[job_id]["preemptions"]))
                break
    return out


def first_steps(rows: list[dict], steps: list[dict], slack_s: float = 0.002) -> None:
    """Sets each row's ``step``: the step that fed its prompt's first chunk."""
    pending = sorted(rows, key=lambda r: r["arrival"])
    for i, s in enumerate(steps):
        start = s["end_s"] - s["seconds"]
        for length, pos in zip(s["prefill_lens"], s["prefill_starts"], strict=True):
            if pos:
                continue
            near = [r for r in pending if "step" not in r and r["arrival"] <= start + slack_s][:12]
            hit = next((r for r in near if r["prompt"] == length), None) or next(
                (r for r in near if r["prompt"] > length), None)
            if hit:
                hit["step"] = i


def legs(rows: list[dict], steps: list[dict], kv_tokens: int) -> list[dict]:
    starts = [s["end_s"] - s["seconds"] for s in steps]
    ends = [s["end_s"] for s in steps]
    out = []
    for r in rows:
        if "step" not in r:
            continue
        first, arrival = r["step"], r["arrival"]
        token_at = arrival + r["server_ttft"]
        last = bisect.bisect_right(ends, token_at) - 1  # the step whose report gave the first token
        if last < first:
            continue
        ahead = [i for i in range(first) if starts[i] > arrival]
        out.append(dict(r, door=(arrival - r["start"]) * 1e3, to_step=(starts[first] - arrival) * 1e3,
                        prefill=(ends[last] - starts[first]) * 1e3, report=(token_at - ends[last]) * 1e3,
                        to_client=(r["ttft"] - (token_at - r["start"])) * 1e3, client=r["ttft"] * 1e3,
                        steps_ahead=len(ahead),
                        full=max((steps[i]["context"] for i in ahead), default=0) >= 0.95 * kv_tokens))
    return out


def stats(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():7.1f} {np.percentile(v, 50):7.1f} {np.percentile(v, 90):7.1f} {np.percentile(v, 99):7.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="peer-results.tgz unpacked")
    parser.add_argument("--run", default="fcfs-mem-r11")
    parser.add_argument("--peer", default="vllm-mem-r11")
    parser.add_argument("--kv-tokens", type=int, default=938 * 16)
    args = parser.parse_args()
    setup = args.run.rsplit("-", 1)[0]
    client = client_rows(args.results / "results" / f"{args.run}.json")
    peer = client_rows(args.results / "results" / f"{args.peer}.json")
    jobs = {}
    for line in (args.results / "logs" / f"{setup}-jobs.jsonl").open():
        j = json.loads(line)
        jobs.setdefault(j["job_id"], j)
    # The set-up's runs in the order they ran (the client stamps each result when its run ends).
    runs = sorted((json.loads(p.read_text())["date"], p.stem)
                  for p in (args.results / "results").glob(f"{setup}-r*.json"))
    nth = [name for _, name in runs].index(args.run)
    rows = match(client, queued_jobs(args.results, setup, len(client), nth), jobs)
    offset = min(r["wall"] - r["start"] for r in rows) - 0.0022
    for r in rows:
        r["arrival"] = r["wall"] - offset
    steps = [json.loads(line) for line in (args.results / "steps" / f"{args.run}.jsonl").open()]
    first_steps(rows, steps)
    got = legs(rows, steps, args.kv_tokens)
    print(f"{args.run}: {len(got)} of {len(client)} requests matched to their job and first step (ms)")
    print(f"{'':34s}    mean     p50     p90     p99")
    for key, name in (("door", "client to scheduler"), ("to_step", "arrival to its first step's start"),
                      ("prefill", "its prefill step(s)"), ("report", "report to scheduler"),
                      ("to_client", "scheduler to client"), ("client", "client TTFT"),
                      ("steps_ahead", "steps ahead of its prefill")):
        print(f"{name:34s} {stats([r[key] for r in got])}")
    if [(p["inp"], p["out"]) for p in peer] != [(r["inp"], r["out"]) for r in client]:
        raise SystemExit(f"{args.peer} did not send {args.run}'s requests in the same order")

    groups = {"started within three steps": [], "arrived while the KV was nearly full": [], "the rest": []}
    for r in got:
        name = ("started within three steps" if r["steps_ahead"] <= 3 else
                "arrived while the KV was nearly full" if r["full"] else "the rest")
        groups[name].append(r)
    print(f"\n{'group':38s} requests  {args.run} mean  {args.peer} mean  share of the means' difference")
    for name, members in groups.items():
        if not members:
            continue
        ours = np.array([r["client"] for r in members])
        theirs = np.array([peer[r["index"]]["ttft"] * 1e3 for r in members])
        print(f"{name:38s} {len(members):8d}  {ours.mean():10.1f}  {theirs.mean():10.1f}  "
              f"{(ours - theirs).sum() / len(client):+8.1f} ms")
    print(f"difference of the means over all requests: "
          f"{np.mean([r['ttft'] for r in client]) * 1e3 - np.mean([p['ttft'] for p in peer]) * 1e3:+.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
