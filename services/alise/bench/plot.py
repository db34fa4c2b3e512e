"""Latency CDFs of several runs on one figure (TTFT, TPOT, ITL, end-to-end), for comparisons."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

PANELS = (("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"), ("itl_s", "ITL (ms)"), ("e2e_s", "E2EL (ms)"))


def _values(results: Sequence, key: str) -> list[float]:
    ok = [r for r in results if not r.error]
    if key == "itl_s":
        return sorted(gap * 1000 for r in ok for gap in r.itl_s)
    return sorted(getattr(r, key) * 1000 for r in ok if not math.isnan(getattr(r, key)))


def plot_cdfs(runs: Mapping[str, Sequence], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, label) in zip(axes, PANELS):
        for name, results in runs.items():
            values = _values(results, key)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
