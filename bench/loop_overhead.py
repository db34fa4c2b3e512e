"""Where a serving run's wall time goes besides the model's steps: a real cluster on this CPU.

    .venv/bin/python bench/loop_overhead.py [--requests 48] [--rounds 2] [--baseline DIR] [--out DIR]

Starts a scheduler and one worker as processes (the embedded tiny-llama, random weights, on
the CPU), sends ``--requests`` prompts of the ``chat`` workload at once (each generating its
real output length, ignore_eos, capped by the context), and reads the worker's step log: the
seconds of every model step (forward + sampling, as the worker times it). Per run it prints
the wall time from the first request to the last token, the steps, the busy fraction (the
steps' seconds over the wall) and the wall time per step *not* spent in a model step.

``--baseline DIR`` runs the same against another checkout of the project (its ``clients/`` and
``services/`` first on ``PYTHONPATH``, this interpreter and its packages), alternating with this
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

HERE = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_of(num: int) -> list[tuple[str, int]]:
    sys.path[:0] = [str(HERE / "clients"), str(HERE / "services")]
    from alise.sim.trace import build_trace, load_pairs, workload_path

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


def run_once(code: Path, requests, policy: str, workdir: Path, label: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": f"{code / 'clients'}:{code / 'services'}"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    steps = workdir / f"{label}-steps.jsonl"
    steps.unlink(missing_ok=True)
    alise = [sys.executable, "-m", "alise.cli.main"]
    logs = [open(workdir / f"{label}-{name}.log", "w") for name in ("scheduler", "worker")]  # noqa: SIM115
    sched = subprocess.Popen(alise + ["scheduler", "--address", address, "--policy", policy],
                             env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    # The scheduler's worker listener: by default the client port + 1 (a tree from before the
    # worker listener took workers on the client port).
    own_listener = "--worker-address" in (code / "services" / "alise" / "scheduler" / "main.py").read_text()
    worker_port = port + 1 if own_listener else port
    worker = subprocess.Popen(alise + ["worker", "--scheduler", f"127.0.0.1:{worker_port}", "--health-address", "",
                                       "--max-num-seqs", str(len(requests)), "--num-device-blocks", "8192",
                                       "--step-log", str(steps)],
                              env=env, stdout=logs[1], stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if subprocess.run(alise + ["health", address], env=env, capture_output=True).returncode == 0 \
                    and "attached" in (workdir / f"{label}-worker.log").read_text():
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"cluster did not start; see {workdir}")
        wall, warm = asyncio.run(drive(address, requests, steps))
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
    return dict(wall_s=wall, steps=len(rows), busy_s=busy, busy=busy / wall,
                gap_ms=1e3 * (wall - busy) / max(len(rows), 1))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--policy", default="alise")
    p.add_argument("--baseline", default="", help="another checkout to compare with, round by round")
    p.add_argument("--out", default="", help="where logs go (default: a temporary directory)")
    args = p.parse_args()
    requests = requests_of(args.requests)
    workdir = Path(args.out or tempfile.mkdtemp(prefix="alise-loop-"))
    workdir.mkdir(parents=True, exist_ok=True)
    trees = [("this tree", HERE)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    print(f"{args.requests} chat requests at once, policy {args.policy}, tiny-llama on this CPU "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}); logs in {workdir}")
    results: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for k in range(args.rounds):
        for name, code in trees:
            r = run_once(code, requests, args.policy, workdir, f"{name.replace(' ', '-')}-{k}")
            results[name].append(r)
            print(f"  round {k} {name:<10} wall {r['wall_s']:6.2f} s  steps {r['steps']:5d}  "
                  f"busy {r['busy']:.3f}  not in a step {r['gap_ms']:5.2f} ms/step", flush=True)
    print(f"{'tree':<12}{'wall s':>8}{'steps':>7}{'busy':>7}{'ms/step not in a step':>24}  (medians)")
    for name, runs in results.items():
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        print(f"{name:<12}{med('wall_s'):8.2f}{med('steps'):7.0f}{med('busy'):7.3f}{med('gap_ms'):24.2f}")
    print(f"(load average now {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
