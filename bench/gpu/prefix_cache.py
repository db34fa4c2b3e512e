"""Multi-turn serving with automatic prefix caching on and off: one command, one table last.

Per arm, starts ``alise scheduler`` and one ``alise worker`` (a preset, random weights) with
``--enable-prefix-caching`` or ``--no-enable-prefix-caching``, replays a multi-turn trace
through the SDK as ``alise bench`` does (a later turn is sent its think time after the turn
before it ended, its prompt the conversation so far), and reads the scheduler's prefill counts
from its status. Both arms replay the same trace on the same machine, one after the other.
Prints per arm: requests done, prompt tokens admitted, cached, the hit rate, the prefill tokens
computed and TTFT p50 / p90; writes the services' logs, per-request results and the table
under $OUT (default /tmp/out).

  # the trace (on a machine with ../shared/data; carried to the GPU machine under .devcarry/):
  alise trace --workload multiturn --num 120 --rate 4 --turns 2-6 --think-time-s 1 \\
      --out .devcarry/prefix/multiturn.jsonl
  # on the GPU machine (an H100: about 3 minutes for both arms; installs the carried wheels):
  OUT=$OUT bash bench/gpu/prefix_cache.sh
  # a CPU check of the same path:
  python bench/gpu/prefix_cache.py --trace T.jsonl --model tiny-llama --device cpu --num 40
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
import time
from pathlib import Path

from alise.client import AliseError, Client
from alise.tools.bench.openloop import run_bench, write_results
from alise.tools.trace import read_trace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: argparse.Namespace, arm: str, out: Path) -> tuple[list[subprocess.Popen], str]:
    """The scheduler and the worker of one arm, both serving (or SystemExit with their logs)."""
    address, worker_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    alise = [sys.executable, "-m", "alise.cli.main"]
    scheduler = [*alise, "scheduler", "--address", address, "--worker-address", worker_address,
                 "--model", args.model, "--policy", args.policy]
    worker = [*alise, "worker", "--scheduler", worker_address, "--model", args.model, "--device", args.device,
              "--max-num-seqs", str(args.max_num_seqs), "--health-address", "",
              "--enable-prefix-caching" if arm == "on" else "--no-enable-prefix-caching"]
    if args.num_device_blocks:
        worker += ["--num-device-blocks", str(args.num_device_blocks)]
    if args.device != "cpu":
        worker += ["--dtype", "float16", "--kernel-plan", str(out / "kernel-plan.json")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out / f"{arm}-{name}.log", "wb"))
             for name, cmd in (("scheduler", scheduler), ("worker", worker))]
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            with Client(address) as client:
                if client.status(timeout_s=2.0).workers:
                    return procs, address
        except AliseError:
            pass
        time.sleep(0.5)
    stop(procs)
    raise SystemExit(f"{arm}: the services did not start; see {out}/{arm}-*.log")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def run_arm(args: argparse.Namespace, arm: str, requests, out: Path) -> dict:
    procs, address = start(args, arm, out)
    try:
        started = time.monotonic()
        results = asyncio.run(run_bench(requests, address, timeout_s=args.timeout_s, max_tokens=args.max_tokens))
        wall = time.monotonic() - started
        with Client(address) as client:
            status = client.status()
    finally:
        stop(procs)
    write_results(results, str(out / f"{arm}.jsonl"))
    ok = [r for r in results if not r.error]
    ttft = sorted(r.ttft_s for r in ok)
    admitted, cached = status.num_admitted_tokens, status.num_cached_tokens
    return dict(arm=arm, requests=f"{len(ok)}/{len(results)}", admitted=admitted, cached=cached,
                hit_rate=cached / admitted if admitted else 0.0, computed=status.num_prefill_tokens,
                ttft_p50_ms=1e3 * statistics.median(ttft) if ttft else float("nan"),
                ttft_p90_ms=1e3 * ttft[int(0.9 * (len(ttft) - 1))] if ttft else float("nan"), wall_s=wall)


def table(rows: list[dict], args: argparse.Namespace, num: int) -> str:
    lines = [f"prefix caching, {args.model} on {args.device}, {num} requests of {args.trace} "
             f"(policy {args.policy}, max_num_seqs {args.max_num_seqs})",
             f"{'caching':<8}{'requests':>10}{'prompt tok':>12}{'cached':>10}{'hit rate':>10}"
             f"{'prefill computed':>18}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}{'wall s':>8}"]
    for r in rows:
        lines.append(f"{r['arm']:<8}{r['requests']:>10}{r['admitted']:>12,}{r['cached']:>10,}{r['hit_rate']:>10.1%}"
                     f"{r['computed']:>18,}{r['ttft_p50_ms']:>13.1f}{r['ttft_p90_ms']:>13.1f}{r['wall_s']:>8.1f}")
    if len(rows) == 2 and rows[1]["computed"]:
        on, off = rows
        lines.append(f"on/off: prefill tokens computed {on['computed'] / off['computed']:.2f}x, "
                     f"TTFT p50 {on['ttft_p50_ms'] / off['ttft_p50_ms']:.2f}x, "
                     f"p90 {on['ttft_p90_ms'] / off['ttft_p90_ms']:.2f}x")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", required=True, help="multi-turn trace JSONL (alise trace --workload multiturn)")
    p.add_argument("--model", default="llama-3-8b", help="preset or directory (default %(default)s)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--num", type=int, default=None, help="first N requests only")
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--num-device-blocks", type=int, default=0, help="0: the worker's sizing")
    p.add_argument("--max-tokens", type=int, default=128, help="cap on each request's output tokens")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    args = p.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/out")) / "prefix_cache"
    out.mkdir(parents=True, exist_ok=True)
    requests = read_trace(args.trace)[:args.num]
    rows = []
    for arm in ("on", "off"):
        rows.append(run_arm(args, arm, requests, out))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, args, len(requests))
    (out / "table.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
