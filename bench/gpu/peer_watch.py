"""Samples a server's Prometheus metrics while a benchmark runs (bench/gpu/peer_vllm.sh).

Every ``--interval`` seconds it reads ``URL`` and keeps the value of each series whose name is
one of ``--names`` (a series is the name with its labels, as the text format writes it), until
SIGTERM or SIGINT; then it writes ``OUT`` (JSON): the sample times (seconds since the first),
each series' values, and the first and last values of the ``--counters`` series (counters and
histogram sums/counts, whose difference over the run is what the run did), and with ``--pids``
the CPU seconds (user + system) each of those processes and their children spent during the
run, by command line: what the serving processes cost per token, whichever has a core to itself.

    python bench/gpu/peer_watch.py URL OUT --names vllm:num_requests_running,vllm:num_requests_waiting \
        --counters vllm:num_preemptions_total,vllm:iteration_tokens_total_count --pids 1234
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import urllib.request

import psutil


def scrape(url: str, names: set[str]) -> dict[str, float]:
    """{series: value} of the metrics named in ``names`` (series = the name with its labels)."""
    with urllib.request.urlopen(url, timeout=2.0) as response:
        text = response.read().decode("utf-8", "replace")
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] in names:
            try:
                values[series] = float(value)
            except ValueError:
                continue
    return values


def cpu_seconds(pids: list[int]) -> dict[int, tuple[str, float]]:
    """{pid: (command line, user + system seconds)} of ``pids`` and all their children."""
    out = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
                out[proc.pid] = (" ".join(proc.cmdline())[:160], t.user + t.system)
            except psutil.Error:
                continue
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--names", default="", help="comma-separated metric names sampled over time")
    p.add_argument("--counters", default="", help="comma-separated metric names kept first and last")
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--pids", default="", help="comma-separated pids whose CPU time (children included) to report")
    args = p.parse_args()
    names = {n for n in args.names.split(",") if n}
    counters = {n for n in args.counters.split(",") if n}
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    times: list[float] = []
    series: dict[str, list[float]] = {}
    first: dict[str, float] | None = None
    last: dict[str, float] = {}
    pids = [int(x) for x in args.pids.split(",") if x]
    cpu_first = cpu_seconds(pids)
    start = time.monotonic()
    errors = 0
    while not stop:
        t = time.monotonic() - start
        try:
            values = scrape(args.url, names | counters)
        except OSError:
            errors += 1
            values = None
        if values is not None:
            counted = {k: v for k, v in values.items() if k.split("{", 1)[0] in counters}
            first = counted if first is None else first
            last = counted
            times.append(round(t, 3))
            for key in {k for k in values if k.split("{", 1)[0] in names} | set(series):
                series.setdefault(key, [None] * (len(times) - 1)).append(values.get(key))
        time.sleep(max(args.interval - (time.monotonic() - start - t), 0.0))
    span = time.monotonic() - start
    cpu = [dict(pid=pid, cmd=cmd, cpu_s=seconds - cpu_first.get(pid, ("", 0.0))[1])
           for pid, (cmd, seconds) in cpu_seconds(pids).items()]
    with open(args.out, "w") as f:
        json.dump(dict(url=args.url, times=times, series=series, first=first or {}, last=last,
                       scrape_errors=errors, span_s=span, cpu=cpu), f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
