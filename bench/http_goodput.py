"""`alise bench --backend grpc` against `--backend openai` on the same trace and cluster, side by side.

    python bench/http_goodput.py [--num 60] [--rate 1.0] [--max-output 48] [--repeats 2]
                                 [--goodput ttft:2000 tpot:400] [--png /tmp/alise-http-goodput.png]

Builds an alpaca trace (`alise trace`'s workload: AlpacaEval prompts with text_davinci_003's
lengths, outputs capped at --max-output so a CPU run takes minutes), starts `alise up`'s
processes (tiny-llama, random weights, one worker), then runs the `alise bench` command itself,
alternating the two doors --repeats times, and prints `alise bench --compare` over the runs
(and a PNG of the latency CDFs). The gRPC runs show the run-to-run noise the HTTP ones are
judged against.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from alise.tools.lab.local_cluster import cpu_cluster


def build_trace(path: str, num: int, rate: float, max_output: int, seed: int) -> None:
    from alise.tools import trace as tr

    requests = tr.build_trace(tr.load_pairs(tr.workload_path("alpaca")), num=num, rate=rate, seed=seed)
    tr.write_trace([tr.TraceRequest(r.id, r.prompt, r.prompt_tokens, min(r.output_tokens, max_output), r.arrival_s)
                    for r in requests], path)


def alise(*args: str) -> None:
    print("$ alise " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "alise.cli.main", *args], check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=60)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--max-output", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="+", default=["ttft:2000", "tpot:400"])
    p.add_argument("--png", default="/tmp/alise-http-goodput.png")
    args = p.parse_args()
    out = tempfile.mkdtemp(prefix="alise-http-goodput-")
    trace = f"{out}/trace.jsonl"
    build_trace(trace, args.num, args.rate, args.max_output, args.seed)
    runs = []
    with cpu_cluster() as (_, address, base_url):
        for i in range(1, args.repeats + 1):
            for backend in ("grpc", "openai"):
                path = f"{out}/{backend}-{i}.json"
                alise("bench", "--trace", trace, "--backend", backend, "--address", address, "--base-url", base_url,
                      "--label", f"{backend}-{i}", "--goodput", *args.goodput, "--json", path)
                runs.append(path)
    print(f"\ntrace: {args.num} alpaca requests, Poisson {args.rate} req/s, outputs capped at {args.max_output} "
          f"tokens; CPU cluster of `alise up` (tiny-llama, random weights, 1 worker), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    alise("bench", "--compare", *runs, "--goodput", *args.goodput, "--png", args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
