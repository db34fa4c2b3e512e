"""Latency CDFs of several runs on one figure (TTFT, TPOT, ITL, end-to-end), for comparisons.

Each panel marks every run's p50 (dashed) and p99 (dotted) with vertical lines in the run's
colour, tagged above the panel and given in the legend below it; the percentiles are those of the printed
table (``alise.tools.bench.metrics.pct``, nearest rank). A panel whose values span more than a
decade (largest over smallest positive value, over all runs) has a log x axis, where a tail
of long latencies would otherwise squeeze the body of the curves against the axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from alise.tools.bench.metrics import pct

PANELS = (("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"), ("itl_s", "ITL (ms)"), ("e2e_s", "E2EL (ms)"))
#: (quantile, line style, tag) of the marked percentiles.
MARKS = ((0.5, "--", "p50"), (0.99, ":", "p99"))


def _values(results: Sequence, key: str) -> list[float]:
    ok = [r for r in results if not r.error]
    if key == "itl_s":
        return sorted(gap * 1000 for r in ok for gap in r.itl_s)
    return sorted(getattr(r, key) * 1000 for r in ok if not math.isnan(getattr(r, key)))


def x_scale(values_by_run: Sequence[Sequence[float]]) -> str:
    """"log" where the positive values of all runs span more than a decade, else "linear"."""
    positive = [v for values in values_by_run for v in values if v > 0]
    return "log" if positive and max(positive) > 10 * min(positive) else "linear"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _panel(ax, runs: Mapping[str, Sequence], key: str, label: str, colors: Sequence[str]) -> None:
    values_by_run = {name: _values(results, key) for name, results in runs.items()}
    ax.set_xscale(x_scale(list(values_by_run.values())))
    for n, (name, values) in enumerate(values_by_run.items()):
        if not values:
            continue
        color = colors[n % len(colors)]
        marks = [(pct(values, q), style, tag) for q, style, tag in MARKS]
        legend = f"{name}: " + ", ".join(f"{tag} {_ms(x)}" for x, _, tag in marks)
        ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                color=color, label=legend)
        for x, style, tag in marks:
            ax.axvline(x, color=color, ls=style, lw=1.0, alpha=0.85)
            # Tags above the plot, one row per run, where no curve runs; the legend, with the
            # values, goes below the panel for the same reason.
            ax.annotate(tag, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2 + 9 * n),
                        textcoords="offset points", fontsize=7, color=color, va="bottom", ha="center")
    if ax.get_xscale() == "log":
        _log_ticks(ax, [v for values in values_by_run.values() for v in values if v > 0])
    ax.set_xlabel(label)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def _log_ticks(ax, values: list[float]) -> None:
    """Plain numbers (5, 10, 20, ..., 2k) rather than powers of ten; 1-2-5 steps over two
    decades at most, where they still fit a panel."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(max(values) / min(values))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def cdf_figure(runs: Mapping[str, Sequence], title: str = ""):
    """The figure, one panel per latency in ``PANELS`` (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.6 * len(PANELS), 3.8 + 0.35 * len(runs)))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        _panel(ax, runs, key, label, colors)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_cdfs(runs: Mapping[str, Sequence], path: str, title: str = "") -> None:
    fig = cdf_figure(runs, title)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
