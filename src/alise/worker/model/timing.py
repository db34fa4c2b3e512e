"""Measurement helpers of the start-up planner: graph-timed device seconds, wall seconds, errors."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def graph_time_s(fn: Callable[[], object], calls: int = 5, reps: int = 5) -> float:
    """Device seconds of one ``fn()``, from replays of a CUDA graph of ``calls`` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def wall_time_s(fn: Callable[[], object], reps: int = 1) -> float:
    """Wall seconds of one ``fn()`` (after one untimed call): the CPU's stand-in for graph timing."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def median_wall_s(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` calls after one untimed call; ``fn`` must end
    with a host sync (a read-back), as a whole engine step does."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_error(out: torch.Tensor, expect: torch.Tensor) -> float:
    """``||out - expect|| / ||expect||`` in float32; infinite when ``out`` holds a NaN or an inf."""
    if not torch.isfinite(out.float()).all():  # float(): fp8 pages have no isfinite of their own
        return float("inf")
    return ((out.float() - expect.float()).norm() / expect.float().norm().clamp_min(1e-30)).item()


def fmt_us(seconds: list[float]) -> str:
    """``"1.2/3.4 us"``: the timings of one report line."""
    return "/".join(f"{t * 1e6:.1f}" for t in seconds) + " us"
