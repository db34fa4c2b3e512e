"""Requests replayed on a real cluster and in the simulator alike: a sample of a trace on fresh
arrivals, and the predictor's cross-fitted estimates keyed by prompt."""

from __future__ import annotations

import random

from alise.core.job import LengthEstimate
from alise.tools.sim.predictions import cross_fitted_estimates
from alise.tools.trace import TraceRequest, arrival_times, read_trace


def pick_requests(trace: str, num: int, rate: float, max_output: int, seed: int,
                  bursty: bool = False) -> list[TraceRequest]:
    """``num`` requests drawn from ``trace`` (seeded), outputs capped at ``max_output``, arriving
    at ``rate`` per second (Poisson, or Gamma when ``bursty``)."""
    pool = read_trace(trace)
    rng = random.Random(seed)
    chosen = rng.sample(pool, num)
    times = arrival_times(num, rate, bursty=bursty, seed=seed + 7)
    return [TraceRequest(r.id, r.prompt, r.prompt_tokens, min(r.output_tokens, max_output), t)
            for r, t in zip(chosen, times, strict=True)]


def estimates_by_prompt(trace: str, predictor: str) -> tuple[dict[str, LengthEstimate], str]:
    """The cross-fitted estimate of every request of ``trace`` by its prompt, and where the
    estimates came from (cached beside the trace)."""
    pool = read_trace(trace)
    est, source = cross_fitted_estimates(pool, method=predictor,
                                         cache_path=f"{trace}.estimates-{predictor}.json")
    return {r.prompt: est[i] for i, r in enumerate(pool)}, source
