"""One scheduler driving many workers: what it adds to each worker's step, by worker count.

    .venv/bin/python bench/scale_workers.py [--workers 1,4,8,16] [--step-ms 15] [--seconds 20]

For each worker count N: a scheduler process (``alise scheduler``, policy alise, the embedded
tiny-llama's tokenizer), N virtual worker processes over real gRPC and a load generator.
A virtual worker is the real worker service (``alise.worker.service.Worker``: its stream, its
step thread, the worker engine and KV manager) whose model step is a sleep of ``--step-ms``
instead of a forward pass. The load generator keeps ``--seqs`` requests per worker in flight
(``--tokens`` tokens each, ignore_eos), so every worker always has jobs running.

From each worker's step log: the time it waited for its next plan after a step that left jobs
running (``waited_s``: the device idle on the scheduler), as mean and p99 per step, and the
busy fraction (step seconds over the span of its steps). The table gives, per N, the worst
worker's mean and p99 and the mean busy fraction. A machine this small runs every process on
two cores: read the figures as what one scheduler process adds, measured together with the
cost of N worker processes and the clients sharing its cores; the CPU columns (cores used
over the run, from /proc) say which of them holds the cores.
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
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def virtual_worker(args: argparse.Namespace) -> None:
    from alise.core.latency_model import LatencyModel
    from alise.modelinfo.identity import ModelIdentity
    from alise.modelinfo.source import resolve_model
    from alise.tools.sim.virtual_worker import LatencyExecutor
    from alise.tools.sim.virtual_worker import virtual_worker as make_engine
    from alise.worker.config import WorkerConfig
    from alise.worker.service import Worker

    class SleepingExecutor(LatencyExecutor):
        """A step that takes ``step_s`` of wall time, as a device would."""

        def execute(self, feeds):
            time.sleep(args.step_ms / 1e3)
            tokens, _, logprobs = super().execute(feeds)
            return tokens, args.step_ms / 1e3, logprobs

    model = resolve_model(None)
    engine = make_engine(num_device_blocks=4096, block_size=16, max_model_len=2048, latency=LatencyModel())
    engine.executor = SleepingExecutor(LatencyModel(), engine.executor.mover)
    identity = ModelIdentity(model.name, "virtual", model.count("vocab_size"), 0, model.model_id)
    worker = Worker(WorkerConfig(scheduler_address=args.scheduler, worker_id=args.worker_id, health_address="",
                                 max_num_seqs=args.seqs, step_log=args.step_log), engine=engine, identity=identity)
    await worker.load()
    task = asyncio.ensure_future(worker.run())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(15, stop.set)
    await stop.wait()
    await worker.stop()
    await task
    worker.close()


async def load(address: str, in_flight: int, tokens: int, seconds: float) -> int:
    from alise.client import AsyncClient

    done = 0
    deadline = time.monotonic() + seconds

    async def loop(client, i: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await client.complete(f"request {i} {done}", max_tokens=tokens, ignore_eos=True)
            done += 1
    async with AsyncClient(address) as client:
        await asyncio.gather(*(loop(client, i) for i in range(in_flight)))
    return done


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (the scheduler's client front), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def run(n: int, streams_process: bool, args: argparse.Namespace, workdir: Path) -> dict:
    port = free_port()
    address, worker_address = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"  # workers: the client port + 1
    alise = [sys.executable, "-m", "alise.cli.main"]
    name = f"n{n}{'-front' if streams_process else ''}"
    log = open(workdir / f"{name}-scheduler.log", "w")
    profile = ["-m", "cProfile", "-o", str(workdir / f"{name}-scheduler.prof")] if args.profile else []
    procs = [subprocess.Popen([sys.executable, *profile, "-m", "alise.cli.main", "scheduler", "--address", address,
                               "--policy", "alise", *(["--streams-process"] if streams_process else [])], env=ENV,
                              stdout=log, stderr=subprocess.STDOUT)]
    logs = [workdir / f"{name}-w{i}-steps.jsonl" for i in range(n)]
    try:
        while subprocess.run(alise + ["health", address], env=ENV, capture_output=True).returncode:
            if procs[0].poll() is not None:
                raise RuntimeError(f"the scheduler exited ({procs[0].returncode}); see {log.name}")
            time.sleep(0.3)
        for i in range(n):
            logs[i].unlink(missing_ok=True)
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--virtual-worker", "--scheduler", worker_address, "--worker-id", f"w{i}",
                 "--step-ms", str(args.step_ms), "--seqs", str(args.seqs), "--step-log", str(logs[i])],
                env=ENV, stdout=log, stderr=subprocess.STDOUT))
        while (workdir / f"{name}-scheduler.log").read_text().count("joined") < n:
            time.sleep(0.3)
        fronts = children(procs[0].pid)
        pids = [p.pid for p in procs]
        cpu0, front0, own0 = [cpu_s(p) for p in pids], sum(map(cpu_s, fronts)), time.process_time()
        t0 = time.monotonic()
        done = asyncio.run(load(address, n * args.seqs, args.tokens, args.seconds))
        cpu1, front1, own1 = [cpu_s(p) for p in pids], sum(map(cpu_s, fronts)), time.process_time()
        wall = time.monotonic() - t0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        log.close()
    per_worker = [step_waits(path) for path in logs]
    # The planning process's CPU per worker step: the steps that ended while it was measured.
    window = sum(t0 <= json.loads(line)["end_s"] <= t0 + wall
                 for path in logs for line in path.read_text().splitlines())
    used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    steps = sum(w["steps"] for w in per_worker)
    return dict(workers=n, front=streams_process, requests=done, steps=steps,
                mean_ms=statistics.fmean(w["mean_ms"] for w in per_worker),
                worst_mean_ms=max(w["mean_ms"] for w in per_worker),
                worst_p99_ms=max(w["p99_ms"] for w in per_worker), worst_ms=max(w["max_ms"] for w in per_worker),
                busy=statistics.fmean(w["busy"] for w in per_worker),
                scheduler_cpu=used[0] / wall, front_cpu=(front1 - front0) / wall,
                workers_cpu=sum(used[1:]) / wall, client_cpu=(own1 - own0) / wall,
                cpu_ms_per_step=1e3 * used[0] / max(window, 1))


def step_waits(path: Path) -> dict:
    """One worker's steps under load (the first tenth, the ramp, left out): how long it
    waited for its next plan after each step that left jobs running."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = rows[len(rows) // 10:]
    waits = sorted(1e3 * r["waited_s"] for r in rows if r.get("waited_s") is not None) or [0.0]
    span = rows[-1]["end_s"] - rows[0]["end_s"] + rows[0]["seconds"]
    return dict(steps=len(rows), mean_ms=statistics.fmean(waits), p99_ms=waits[int(0.99 * (len(waits) - 1))],
                max_ms=waits[-1], busy=sum(r["seconds"] for r in rows) / span)


def decision_median(policy: str) -> float:
    """bench/sched_overhead.py's figure: one plan decision's median, ms, with 1,000 queued
    and 256 running jobs."""
    sys.path.insert(0, str(HERE / "bench"))
    import sched_overhead

    timings, _, _ = sched_overhead.run(policy, num_running=256, num_queued=1000, steps=300, seed=0, rest=[])
    return 1e3 * statistics.median(timings)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", default="1,4,8,16")
    p.add_argument("--step-ms", type=float, default=15.0)
    p.add_argument("--seqs", type=int, default=4, help="requests in flight per worker")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--streams", default="front,inline",
                   help="where the client streams run: front (--streams-process), inline, or both")
    p.add_argument("--out", default="")
    p.add_argument("--profile", action="store_true", help="run the scheduler under cProfile (<run>-scheduler.prof)")
    p.add_argument("--virtual-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scheduler", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-id", default="", help=argparse.SUPPRESS)
    p.add_argument("--step-log", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.virtual_worker:
        asyncio.run(virtual_worker(args))
        return 0
    workdir = Path(args.out or tempfile.mkdtemp(prefix="alise-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"virtual workers stepping every {args.step_ms:g} ms, {args.seqs} requests in flight each of "
          f"{args.tokens} tokens, {args.seconds:g} s per run ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}); logs in {workdir}")
    print(f"{'streams':>8}{'workers':>8}{'requests':>9}{'steps':>7}{'busy':>7}"
          f"{'wait/step ms: mean':>19}{'worst mean':>11}{'p99':>7}{'max':>7}"
          f"{'CPU: sched':>11}{'front':>7}{'workers':>8}{'client':>7}{'sched ms/step':>14}")
    for n in [int(x) for x in args.workers.split(",")]:
        for mode in args.streams.split(","):
            r = run(n, mode == "front", args, workdir)
            print(f"{mode:>8}{r['workers']:8d}{r['requests']:9d}{r['steps']:7d}{r['busy']:7.3f}"
                  f"{r['mean_ms']:19.2f}{r['worst_mean_ms']:11.2f}{r['worst_p99_ms']:7.2f}{r['worst_ms']:7.1f}"
                  f"{r['scheduler_cpu']:11.2f}{r['front_cpu']:7.2f}{r['workers_cpu']:8.2f}{r['client_cpu']:7.2f}"
                  f"{r['cpu_ms_per_step']:14.2f}", flush=True)
    print("(wait: a worker's wait for its next plan after a step, per step: the mean over workers, then the "
          "worst worker's mean, p99 and longest; CPU: cores used over the run; sched ms/step: the planning "
          f"process's CPU per worker step)\n(load average now {os.getloadavg()[0]:.2f})")
    print(f"plan decision with 1,000 queued and 256 running (bench/sched_overhead.py, alise): median "
          f"{decision_median('alise'):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
