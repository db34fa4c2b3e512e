"""Where a serving run's wall time goes besides the model's steps: a real cluster on this CPU.

    .venv/bin/python bench/loop_overhead.py [--requests 48] [--rounds 2] [--baseline DIR] [--out DIR]
        [--virtual PROFILE [--scale X]] [--max-tokens N]

Starts a scheduler and one worker as processes (the embedded tiny-llama, random weights, on
the CPU), sends ``--requests`` prompts of the ``chat`` workload at once (each generating its
real output length, ignore_eos, capped by the context and ``--max-tokens``), and reads the
worker's step log: the seconds of every model step (forward + sampling, as the worker times
it) and how long the worker waited for each plan while it had jobs running. Per run it prints
the wall time from the first request to the last token, the steps, the busy fraction (the
steps' seconds over the wall), the wall time per step *not* spent in a model step, and the
plan wait per step (mean, and the share of steps that waited over a millisecond) and the CPU
seconds the scheduler process spent (the warm-up request's included).

``--virtual PROFILE`` serves the OPT-13B preset with a worker whose steps last what the
latency profile says (``bench/gpu/peer_virtual.py``, ``--scale`` on each step): the worker
then takes almost no CPU, and with hundreds of streams the scheduler's own work (planning,
detokenizing and writing every stream's tokens) is what a plan can wait for.

``--baseline DIR`` runs the same against another checkout of the project (its ``src/`` first on
``PYTHONPATH``, this interpreter and its packages), alternating with this
tree round by round, so the two are compared on the same shared machine in one run. The load
average is printed: compare quiet runs, as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alise.tools.lab.checkout import package_file, pythonpath

HERE = Path(__file__).resolve().parents[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_of(num: int) -> list[tuple[str, int]]:
    from alise.tools.trace import build_trace, load_pairs, workload_path

    trace = build_trace(load_pairs(workload_path("chat")), num=num, rate=1.0, seed=0)
    return [(r.prompt, min(r.output_tokens, 2048 - 2 * r.prompt_tokens - 8)) for r in trace]


async def drive(address: str, requests: list[tuple[str, int]], steps: Path) -> tuple[float, int]:
    """(wall seconds of the run, step-log lines written before it: the warm-up's)."""
    from alise.client import AsyncClient

    async with AsyncClient(address) as client:
        await client.complete("warm up", max_tokens=2, ignore_eos=True)
        await asyncio.sleep(0.2)
        warm = len(steps.read_text().splitlines()) if steps.exists() else 0
        start = time.monotonic()
        results = await asyncio.gather(*(client.complete(prompt, max_tokens=max(n, 1), ignore_eos=True)
                                         for prompt, n in requests))
        wall = time.monotonic() - start
    assert all(r.token_ids for r in results)
    return wall, warm


def worker_command(code: Path, args, worker_port: int, health_port: int, steps: Path, num_seqs: int) -> list[str]:
    if not args.virtual:
        return [sys.executable, "-m", "alise.cli.main", "worker", "--scheduler", f"127.0.0.1:{worker_port}",
                "--health-address", "", "--max-num-seqs", str(num_seqs), "--num-device-blocks", "8192",
                "--step-log", str(steps)]
    return [sys.executable, str(code / "bench" / "gpu" / "peer_virtual.py"), "--scheduler", f"127.0.0.1:{worker_port}",
            "--profile", str(Path(args.virtual).resolve()), "--scale", str(args.scale),
            "--health-address", f"127.0.0.1:{health_port}", "--max-num-seqs", str(num_seqs),
            "--num-device-blocks", "8192", "--step-log", str(steps)]


def attached(alise: list[str], env: dict, workdir: Path, label: str, health: str) -> bool:
    """The worker holds its stream to the scheduler (a virtual one says so on its health port)."""
    if health:
        return subprocess.run(alise + ["health", health], env=env, capture_output=True).returncode == 0
    return "attached" in (workdir / f"{label}-worker.log").read_text()


def run_once(code: Path, requests, args, workdir: Path, label: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": pythonpath(code)}
    port = free_port()
    address = f"127.0.0.1:{port}"
    steps = workdir / f"{label}-steps.jsonl"
    steps.unlink(missing_ok=True)
    alise = [sys.executable, "-m", "alise.cli.main"]
    logs = [open(workdir / f"{label}-{name}.log", "w") for name in ("scheduler", "worker")]
    model = ["--model", "opt-13b"] if args.virtual else []
    sched = subprocess.Popen(alise + ["scheduler", "--address", address, "--policy", args.policy, *model],
                             env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    # The scheduler's worker listener: by default the client port + 1 (a tree from before the
    # worker listener took workers on the client port).
    own_listener = "--worker-address" in package_file(code, "scheduler/main.py").read_text()
    worker_port = port + 1 if own_listener else port
    health = f"127.0.0.1:{free_port()}" if args.virtual else ""
    worker = subprocess.Popen(worker_command(code, args, worker_port, int(health.rpartition(":")[2] or 0), steps,
                                             len(requests)),
                              env=env, stdout=logs[1], stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if subprocess.run(alise + ["health", address], env=env, capture_output=True).returncode == 0 \
                    and attached(alise, env, workdir, label, health):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"cluster did not start; see {workdir}")
        sched_cpu = cpu_s(sched.pid)
        wall, warm = asyncio.run(drive(address, requests, steps))
        sched_cpu = cpu_s(sched.pid) - sched_cpu  # the run's and its warm-up's
        time.sleep(0.2)
        rows = [json.loads(line) for line in steps.read_text().splitlines()][warm:]
    finally:
        for proc in (worker, sched):
            proc.terminate()
        for proc in (worker, sched):
            proc.wait(30)
        for log in logs:
            log.close()
    busy = sum(r["seconds"] for r in rows)
    waits = [r["waited_s"] for r in rows if r.get("waited_s") is not None]
    return dict(wall_s=wall, steps=len(rows), busy_s=busy, busy=busy / wall, sched_cpu_s=sched_cpu,
                gap_ms=1e3 * (wall - busy) / max(len(rows), 1),
                wait_ms=1e3 * sum(waits) / max(len(rows), 1),
                waited=sum(w > 1e-3 for w in waits) / max(len(rows), 1))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--policy", default="alise")
    p.add_argument("--baseline", default="", help="another checkout to compare with, round by round")
    p.add_argument("--out", default="", help="where logs go (default: a temporary directory)")
    p.add_argument("--virtual", default="", metavar="PROFILE",
                   help="a worker whose steps last what this latency profile says (OPT-13B preset)")
    p.add_argument("--scale", type=float, default=1.0, help="factor on every virtual step's time")
    p.add_argument("--max-tokens", type=int, default=0, help="cap on each request's output (0: none)")
    args = p.parse_args()
    requests = requests_of(args.requests)
    if args.max_tokens:
        requests = [(prompt, min(n, args.max_tokens)) for prompt, n in requests]
    workdir = Path(args.out or tempfile.mkdtemp(prefix="alise-loop-"))
    workdir.mkdir(parents=True, exist_ok=True)
    trees = [("this tree", HERE)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    engine = (f"a virtual worker at the pace of {args.virtual} x {args.scale:g}" if args.virtual
              else "tiny-llama on this CPU")
    print(f"{args.requests} chat requests at once, policy {args.policy}, {engine} "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}); logs in {workdir}")
    results: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for k in range(args.rounds):
        for name, code in trees:
            r = run_once(code, requests, args, workdir, f"{name.replace(' ', '-')}-{k}")
            results[name].append(r)
            print(f"  round {k} {name:<10} wall {r['wall_s']:6.2f} s  steps {r['steps']:5d}  "
                  f"busy {r['busy']:.3f}  not in a step {r['gap_ms']:5.2f} ms/step  "
                  f"plan wait {r['wait_ms']:5.2f} ms/step ({100 * r['waited']:.0f} % of steps > 1 ms)  "
                  f"scheduler CPU {r['sched_cpu_s']:.2f} s", flush=True)
    print(f"{'tree':<12}{'wall s':>8}{'steps':>7}{'busy':>7}{'ms/step not in a step':>24}"
          f"{'plan wait ms/step':>19}{'steps > 1 ms':>14}{'sched CPU s':>13}  (medians)")
    for name, runs in results.items():
        def med(key: str, runs: list = runs) -> float:
            return statistics.median(r[key] for r in runs)

        print(f"{name:<12}{med('wall_s'):8.2f}{med('steps'):7.0f}{med('busy'):7.3f}{med('gap_ms'):24.2f}"
              f"{med('wait_ms'):19.2f}{100 * med('waited'):13.0f}%{med('sched_cpu_s'):13.2f}")
    print(f"(load average now {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
