"""Slowloris against the HTTP door: thousands of connections that send nothing, held open
(each one the door closes is opened again), while users send ordinary completions.

A real CPU cluster (`alise up`'s scheduler, worker and door as processes, alise.tools.lab.local_cluster)
is attacked in phases: none (the baseline), then ``--connections`` idle connections from one
address, then the same spread over ``--addresses`` loopback addresses (127.0.1.x: as from
that many hosts). The attacker is a process of its own with its open-file limit raised to the
hard limit; users connect from 127.0.0.1, one new connection per request (a new user), at
``--rate`` requests a second. Reported per phase: the users' requests (answered 200, 503,
other or no answer within 10 s), their latency (connect included) p50 / p99 / max, how many
idle connections the attacker held open (mean and max of its 1 s samples), and how many the
door closed by reason (its ``alise_http_connections_closed_total``), and the door process's CPU (share of one core).

``--compare-with DIR`` also attacks a door run from another checkout (``DIR/src`` on its
PYTHONPATH, e.g. ``git archive <commit> | tar -x -C DIR``) in front of
the same cluster: before and after, on one machine in one run.

    python bench/slowloris.py
    python bench/slowloris.py --connections 8300 --addresses 100 --phase-s 20 --compare-with /tmp/old
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import time

import httpx
import numpy as np

from alise.tools.lab.checkout import pythonpath
from alise.tools.lab.door_load import attacker, raise_open_files
from alise.tools.lab.local_cluster import cpu_cluster, free_port


async def users(base_url: str, rate: float, duration_s: float) -> list[tuple[float, str]]:
    """(latency s, outcome) of one request every 1/rate s, each on a new connection."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10.0) as client:
        async def one() -> tuple[float, str]:
            sent = time.monotonic()
            try:
                reply = await client.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 4})
                outcome = str(reply.status_code)
            except httpx.TimeoutException:
                outcome = "timeout"
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            return time.monotonic() - sent, outcome

        tasks, start = [], time.monotonic()
        while time.monotonic() - start < duration_s:
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(1.0 / rate)
        return await asyncio.gather(*tasks)


def closed_counts(base_url: str) -> dict[str, float]:
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("alise_http_connections_closed_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def phase(base_url: str, door_pid: int, port: int, args, connections: int, addresses: int) -> dict:
    from alise.tools.lab.local_cluster import cpu_seconds

    ctx = multiprocessing.get_context("spawn")
    stop, samples = ctx.Event(), ctx.Queue()
    proc = None
    closed_before = closed_counts(base_url)
    if connections:
        proc = ctx.Process(target=attacker, args=(port, connections, addresses, args.reopen_s, stop, samples))
        proc.start()
        time.sleep(args.ramp_s)  # the connections are open before users are measured
    cpu_before, started = cpu_seconds(door_pid), time.monotonic()
    results = asyncio.run(users(base_url, args.rate, args.phase_s))
    door_cpu = (cpu_seconds(door_pid) - cpu_before) / (time.monotonic() - started)
    held = []
    if proc is not None:
        stop.set()
        held = samples.get(timeout=120)
        proc.join(60)
        time.sleep(1.0)
    closed_after = closed_counts(base_url)
    latencies = np.array([lat for lat, outcome in results if outcome == "200"]) * 1e3
    outcomes = [outcome for _, outcome in results]
    measured = held[int(args.ramp_s):] or held
    return dict(users=len(results), ok=outcomes.count("200"), busy=outcomes.count("503"),
                other=len(outcomes) - outcomes.count("200") - outcomes.count("503"),
                p50=float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
                p99=float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
                max=float(latencies.max()) if len(latencies) else float("nan"),
                held_mean=float(np.mean(measured)) if measured else 0.0, held_max=max(measured, default=0),
                closed={k: closed_after.get(k, 0) - closed_before.get(k, 0) for k in closed_after},
                door_cpu=door_cpu,
                outcomes=sorted(set(outcomes)))


def start_door(pythonpath_dir: str, scheduler: str) -> tuple[subprocess.Popen, str, int]:
    """A door run from another checkout: (process, base URL, port)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=pythonpath(pythonpath_dir))
    proc = subprocess.Popen([sys.executable, "-m", "alise.cli.main", "http", "--scheduler", scheduler,
                             "--address", f"127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base, port
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the door from {pythonpath_dir} did not start")


def run_phases(name: str, base_url: str, door_pid: int, args) -> list[tuple[str, str, dict]]:
    port = int(base_url.rsplit(":", 1)[1])
    rows = [(name, "no attack", phase(base_url, door_pid, port, args, 0, 1))]
    for addresses in args.address_counts:
        label = f"{args.connections} idle from {addresses} address{'es' if addresses > 1 else ''}"
        rows.append((name, label, phase(base_url, door_pid, port, args, args.connections, addresses)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=8300, help="idle connections the attacker holds")
    p.add_argument("--addresses", type=int, action="append", dest="address_counts",
                   help="source addresses the attack comes from, one phase each (default: 1 and 100)")
    p.add_argument("--rate", type=float, default=4.0, help="users' requests a second")
    p.add_argument("--phase-s", type=float, default=20.0, help="seconds users are measured per phase")
    p.add_argument("--ramp-s", type=float, default=8.0, help="seconds the attack runs before users are")
    p.add_argument("--reopen-s", type=float, default=1.0, help="the attacker reopens a closed connection after")
    p.add_argument("--compare-with", default=None, help="a checkout whose door is attacked too")
    args = p.parse_args()
    args.address_counts = args.address_counts or [1, 100]
    print(f"open-file limit raised to {raise_open_files()}", flush=True)
    rows = []
    with cpu_cluster() as (cluster, scheduler, base_url):
        rows += run_phases("this tree", base_url, cluster.procs["http"].pid, args)
        if args.compare_with:
            proc, other_url, _ = start_door(args.compare_with, scheduler)
            try:
                rows += run_phases(os.path.basename(args.compare_with.rstrip("/")), other_url, proc.pid, args)
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"\nusers: {args.rate:g} completions/s (4 tokens), a new connection each, for {args.phase_s:g} s "
          f"per phase; the attack holds its connections {args.ramp_s:g} s before")
    print(f"{'door':<12}{'phase':<30}{'users':>6}{'200':>6}{'503':>6}{'other':>6}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'max ms':>8}{'held mean/max':>15}{'door CPU':>10}  closed by the door")
    for name, label, r in rows:
        closed = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["closed"].items()) if v) or "-"
        print(f"{name:<12}{label:<30}{r['users']:>6}{r['ok']:>6}{r['busy']:>6}{r['other']:>6}{r['p50']:>8.0f}"
              f"{r['p99']:>8.0f}{r['max']:>8.0f}{r['held_mean']:>9.0f}/{r['held_max']:<5}{r['door_cpu']:>9.0%}"
              f"  {closed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
