"""A run's figures in the conventions of ``vllm bench serve``, plus ALISE's normalized latency.

Per request (client clock): TTFT (send to the first chunk with output), TPOT ((end-to-end -
TTFT) / (tokens - 1)), ITL (every gap between successive chunks), E2EL (send to the last
chunk) and normalized latency (E2EL / tokens). Per run: completed and failed counts, request,
output-token and total-token throughput over the run's span, and goodput: requests per second
that met every SLO given (``ttft``, ``tpot``, ``e2el`` in ms; a one-token request meets any
TPOT SLO, as in vLLM). Percentiles are nearest-rank.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

SLO_METRICS = {"ttft": "ttft_s", "tpot": "tpot_s", "e2el": "e2e_s"}
#: (summary key, label, unit scale) of the latency sections, in vLLM's order.
SECTIONS = (("ttft_s", "TTFT", "Time to First Token"), ("tpot_s", "TPOT", "Time per Output Token (excl. 1st token)"),
            ("itl_s", "ITL", "Inter-token Latency"), ("e2e_s", "E2EL", "End-to-end Latency"))


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slo = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in SLO_METRICS:
            raise ValueError(f"goodput SLO {item!r}: the metric must be one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: the value must be a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"goodput SLO {item!r}: the value must be > 0 ms")
        slo[key] = ms
    return slo


def meets_slo(r, slo: Mapping[str, float]) -> bool:
    for key, ms in slo.items():
        value = getattr(r, SLO_METRICS[key])
        if key == "tpot" and math.isnan(value):
            continue
        if not value * 1000 <= ms:
            return False
    return True


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _stats(values: list[float]) -> dict:
    return dict(mean=statistics.fmean(values) if values else math.nan,
                p50=pct(values, 0.5), p90=pct(values, 0.9), p99=pct(values, 0.99))


def summarize(results: Sequence, slo: Mapping[str, float] | None = None) -> dict:
    ok = [r for r in results if not r.error]
    span = max((r.sent_s + r.e2e_s for r in ok), default=0.0)
    rate = (lambda n: n / span if span > 0 else 0.0)  # noqa: E731
    out_tokens = sum(r.num_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    out = dict(num_requests=len(results), num_ok=len(ok), num_failed=len(results) - len(ok),
               duration_s=span, total_input_tokens=in_tokens, total_output_tokens=out_tokens,
               throughput_req_s=rate(len(ok)), throughput_tok_s=rate(out_tokens),
               total_throughput_tok_s=rate(in_tokens + out_tokens))
    for name in ("ttft_s", "tpot_s", "e2e_s", "normalized_latency_s"):
        out[name] = _stats([getattr(r, name) for r in ok if not math.isnan(getattr(r, name))])
    out["itl_s"] = _stats([gap for r in ok for gap in r.itl_s])
    longest = sorted(ok, key=lambda r: r.output_tokens)[-max(1, math.ceil(0.05 * len(ok))):] if ok else []
    out["p99_longest5_normalized_latency_s"] = pct([r.normalized_latency_s for r in longest], 0.99)
    if slo:
        good = sum(1 for r in ok if meets_slo(r, slo))
        out.update(goodput_slo_ms=dict(slo), num_good=good, goodput_req_s=rate(good))
    return out


def format_summary(s: dict, title: str = "bench") -> str:
    w = 50
    lines = [f"{' ' + title + ' ':=^{w}}"]

    def row(label, value, fmt="{:.2f}"):
        lines.append(f"{label:<40}{fmt.format(value):>10}")

    row("Successful requests:", s["num_ok"], "{}")
    row("Failed requests:", s["num_failed"], "{}")
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"], "{}")
    row("Total generated tokens:", s["total_output_tokens"], "{}")
    row("Request throughput (req/s):", s["throughput_req_s"])
    if "goodput_req_s" in s:
        slo = " ".join(f"{k}:{v:g}" for k, v in s["goodput_slo_ms"].items())
        row(f"Request goodput (req/s) [{slo}]:"[:40], s["goodput_req_s"])
    row("Output token throughput (tok/s):", s["throughput_tok_s"])
    row("Total token throughput (tok/s):", s["total_throughput_tok_s"])
    for key, short, long in SECTIONS:
        lines.append(f"{long:-^{w}}")
        m = s[key]
        for stat, label in (("mean", "Mean"), ("p50", "Median"), ("p99", "P99")):
            row(f"{label} {short} (ms):", m[stat] * 1000)
    lines.append(f"{'Normalized latency (E2EL / tokens)':-^{w}}")
    m = s["normalized_latency_s"]
    for stat, label in (("mean", "Mean"), ("p50", "Median"), ("p99", "P99")):
        row(f"{label} normalized (ms/token):", m[stat] * 1000)
    row("P99 normalized, longest 5 % (ms/token):", s["p99_longest5_normalized_latency_s"] * 1000)
    lines.append("=" * w)
    return "\n".join(lines)


def format_comparison(runs: Mapping[str, dict]) -> str:
    """Runs side by side: one column per run, the rows of ``format_summary``."""
    labels = list(runs)
    width = max(12, *(len(label) + 2 for label in labels))
    lines = [f"{'':<34}" + "".join(f"{label:>{width}}" for label in labels)]

    def row(label, values, fmt="{:.2f}"):
        lines.append(f"{label:<34}" + "".join(f"{fmt.format(v):>{width}}" for v in values))

    def each(key):
        return [runs[label].get(key, math.nan) for label in labels]

    row("completed", each("num_ok"), "{}")
    row("failed", each("num_failed"), "{}")
    row("duration (s)", each("duration_s"))
    row("request throughput (req/s)", each("throughput_req_s"))
    if any("goodput_req_s" in s for s in runs.values()):
        row("goodput (req/s)", each("goodput_req_s"))
        row("requests meeting the SLOs", each("num_good"), "{}")
    row("output throughput (tok/s)", each("throughput_tok_s"))
    for key, short, _ in SECTIONS + (("normalized_latency_s", "normalized", ""),):
        for stat, label in (("mean", "mean"), ("p50", "median"), ("p99", "p99")):
            row(f"{short} {label} (ms)", [runs[k][key][stat] * 1000 for k in labels])
    return "\n".join(lines)
