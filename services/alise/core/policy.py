"""Scheduling policies: an ordering over jobs, and two switches the core obeys.

A policy answers one question, "which job should run sooner?", as a sort key (lower runs
first). The core does admission, preemption and memory; the policy only orders.

* ``fcfs``   vLLM's behaviour: arrival order, no preemption on arrival, no skipping ahead.
* ``alise``  shortest estimated remaining execution time first, preemptive, with the
             re-estimation and aging rules below.
* ``oracle`` the same with the true output lengths: the bound on what prediction can buy.

Misprediction rule (``remaining_output_tokens``): a job is charged its point estimate
minus what it has generated; once it outruns the point estimate it is charged up to its
p90; once past p90 the estimate grows geometrically: the job is assumed to produce
``overrun_growth - 1`` times what it has produced so far (doubling its expected total
each time it is outrun). A job that outran its prediction therefore never keeps a stale
near-zero remaining time.

Aging rule: a job's key falls by ``aging_rate`` seconds per second it has spent waiting
or paused, so a job of estimated remaining time R that keeps being overtaken runs after
at most about R / aging_rate seconds of waiting.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

from alise.core.job import Job, JobStatus, KvPlace, LengthEstimate
from alise.core.latency_model import LatencyModel

#: Used when a job has no estimate (predictor down and nothing observed yet).
DEFAULT_ESTIMATE = LengthEstimate(mean=128.0, p50=128.0, p90=512.0, source="prior")


class Policy(abc.ABC):
    name = "base"
    #: May a waiting or paused job displace a running one?
    preemptive = False
    #: May a job that fits run ahead of an earlier one that does not?
    backfill = False

    @abc.abstractmethod
    def key(self, job: Job, now_s: float) -> float:
        """Sort key: lower runs sooner."""

    def keys(self, jobs: list[Job], now_s: float) -> list[float]:
        """``[self.key(job, now_s) for job in jobs]``; policies may compute it faster."""
        return [self.key(job, now_s) for job in jobs]

    def reserve_tokens(self, job: Job) -> float:
        """KV tokens to hold back for ``job``'s growth over the next steps when admitting
        others beside it (0: admit whatever fits now, vLLM's rule)."""
        return 0.0

    def latency_changed(self) -> None:
        """The latency model's coefficients were replaced; drop anything priced with the old."""


class FcfsPolicy(Policy):
    name = "fcfs"

    def key(self, job: Job, now_s: float) -> float:
        return job.arrival_s

    def keys(self, jobs: list[Job], now_s: float) -> list[float]:
        return [job.arrival_s for job in jobs]


@dataclass
class RemainingTimeEstimator:
    """Estimated remaining execution time of a job, from its length estimate."""

    latency: LatencyModel
    overrun_growth: float = 2.0
    #: Batch size used to share a decode step's fixed cost between members.
    typical_batch: int = 8

    def remaining_output_tokens(self, job: Job, estimate: LengthEstimate) -> float:
        return self._remaining_tokens(len(job.output_token_ids), job.sampling.max_tokens, estimate)

    def _remaining_tokens(self, done: int, limit: int, estimate: LengthEstimate) -> float:
        if done < estimate.mean:
            remaining = estimate.mean - done
        elif done < estimate.p90:
            remaining = estimate.p90 - done
        else:
            remaining = done * (self.overrun_growth - 1.0)
        return max(min(remaining, limit - done), 1.0)

    def remaining_s(self, job: Job, estimate: LengthEstimate) -> float:
        return self.remaining_base_s(job, estimate) * self.latency.correction

    def remaining_base_s(self, job: Job, estimate: LengthEstimate) -> float:
        """``remaining_s`` before the latency model's online correction factor.

        Inlined (this runs for every candidate at every step): a prefill of the whole
        sequence when its KV is gone, then the remaining tokens at the marginal decode cost
        of one member of a typical batch, at the mean context over the rest of the job.
        """
        done = len(job.output_token_ids)
        num_tokens = len(job.prompt_token_ids) + done
        tokens = self._remaining_tokens(done, job.sampling.max_tokens, estimate)
        lat = self.latency
        prefill = 0.0
        if job.kv is KvPlace.NONE:
            prefill = (lat.c0_s + lat.c_seq_s + lat.c_mixed_s + lat.c_chunk_s
                       + (lat.c_ctx_s + lat.c_pre_s) * num_tokens + lat.c_pre2_s * num_tokens * num_tokens)
        context = num_tokens + tokens / 2
        per_token = lat.c0_s / self.typical_batch + lat.c_seq_s + lat.c_ctx_s * context
        return prefill + tokens * per_token


#: Subtracted from the key of a starved job: it runs before every job that is not starved.
STARVED_BOOST_S = 1e6


class AlisePolicy(Policy):
    """Shortest estimated remaining time first, preemptive, with hysteresis and a starvation bound.

    Key of a job (seconds, lower runs sooner)::

        waiting or paused:  R(job) - aging_rate * waited
        running:            R(job) * (1 - hysteresis) - switch_cost_s - aging_rate * waited
        starved (either):   the above - STARVED_BOOST_S

    ``R`` is the remaining execution time (``RemainingTimeEstimator``: the misprediction rule
    of the module doc, plus a prefill of the whole sequence when its KV is gone), ``waited``
    the time the job has spent waiting or paused so far. A running job keeps its place unless
    a rival is shorter by both a fraction (``hysteresis``: predictions are noisy, and a swap
    on a near-tie churns memory for nothing) and an absolute margin (``switch_cost_s``: a
    preemption costs at least a step).

    Starvation rule: a job is *starved* once its age (now - arrival) exceeds ``max_slowdown``
    times its expected total output (generated + estimated remaining tokens) at the unloaded
    cost of a token (``step_s(1, prompt)``), i.e. once its normalized latency so far is
    ``max_slowdown`` times the unloaded one, and at least ``min_starve_s`` (a job that has
    waited a few seconds is not starving, however short). Starved jobs run before all others, among
    themselves by the same key; a job that stays starved keeps running to the end. So no job's
    normalized latency grows far past ``max_slowdown`` times unloaded while the server keeps
    up, and shortest-first degrades to arrival order only under overload (off by default:
    ``max_slowdown=None``). Linear aging (``aging_rate``): a job of remaining time R overtakes
    a fresh job after about R / aging_rate seconds of waiting.

    Growth reserve: a job is admitted or resumed only if, beside the blocks every selected job
    needs now, the device keeps room for each selected job's growth over the next
    ``min(reserve_fraction * its estimated remaining tokens, reserve_horizon_tokens)`` tokens.
    Without it, shortest-first admits every short newcomer that fits *now*, the batch then
    outgrows the cache within a few steps, and the core pauses its lowest-priority job,
    usually a long one with a large context, whose KV is dropped and recomputed later: churn
    that a served GPU profile prices at an eager mixed step each time. The defaults (10 %,
    at most 64 tokens) keep that headroom small for short jobs and bounded for long ones
    (docs/sim.md, "Growth reserve").

    Between two steps only running jobs change ``R``, so ``keys`` computes each waiting
    job's remaining time once per wait.
    """

    name = "alise"
    preemptive = True
    backfill = True

    def __init__(self, latency: LatencyModel, *, aging_rate: float = 0.03,
                 switch_cost_s: float | None = None, overrun_growth: float = 2.0,
                 hysteresis: float = 0.3, max_slowdown: float | None = None,
                 min_starve_s: float = 10.0, reserve_horizon_tokens: int = 64,
                 reserve_fraction: float = 0.1, preemptive: bool = True) -> None:
        if aging_rate < 0:
            raise ValueError(f"aging_rate must be >= 0, got {aging_rate}")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis}")
        if max_slowdown is not None and not max_slowdown > 0:
            raise ValueError(f"max_slowdown must be > 0 or None, got {max_slowdown}")
        self.estimator = RemainingTimeEstimator(latency, overrun_growth=overrun_growth)
        self.aging_rate = aging_rate
        self.hysteresis = hysteresis
        self.max_slowdown = max_slowdown
        self.min_starve_s = min_starve_s
        if reserve_horizon_tokens < 0 or not 0 <= reserve_fraction <= 1:
            raise ValueError(f"reserve_horizon_tokens must be >= 0 and reserve_fraction in [0, 1], "
                             f"got {reserve_horizon_tokens} and {reserve_fraction}")
        #: 0 when either is 0: no reserve (the core then selects without the reserving walk).
        self.reserve_horizon_tokens = reserve_horizon_tokens if reserve_fraction > 0 else 0
        self.reserve_fraction = reserve_fraction
        self.preemptive = preemptive
        self._switch_cost_s = switch_cost_s
        #: id(job) -> (job, signature, remaining_s, starved_after_s) for idle jobs.
        self._idle_cache: dict[int, tuple] = {}

    @property
    def switch_cost_s(self) -> float:
        """A running job keeps its place unless a rival is shorter by more than this: a
        preemption costs at least a step and churns memory. Default: four single-sequence
        steps of the latency model (which may be replaced when a worker brings its profile)."""
        if self._switch_cost_s is not None:
            return self._switch_cost_s
        return 4 * self.estimator.latency.step_s(1, 0)

    def latency_changed(self) -> None:
        """The latency model's coefficients changed: cached remaining times are stale."""
        self._idle_cache.clear()

    def estimate_of(self, job: Job) -> LengthEstimate:
        return job.estimate or DEFAULT_ESTIMATE

    def _parts(self, job: Job) -> tuple[float, float]:
        """(remaining seconds before correction, age after which the job counts as starved)."""
        estimate = self.estimate_of(job)
        est = self.estimator
        remaining = est.remaining_base_s(job, estimate)
        if self.max_slowdown is None:
            return remaining, math.inf
        done = len(job.output_token_ids)
        total = done + est._remaining_tokens(done, job.sampling.max_tokens, estimate)
        unloaded_s = total * est.latency.step_s(1, len(job.prompt_token_ids))
        return remaining, max(self.max_slowdown * unloaded_s, self.min_starve_s)

    def key(self, job: Job, now_s: float) -> float:
        return self.keys([job], now_s)[0]

    def keys(self, jobs: list[Job], now_s: float) -> list[float]:
        # One loop for all candidates (the hot path of every scheduling step). A job that is
        # not running keeps its remaining time while it waits: it is computed once per wait.
        cache = self._idle_cache
        running = JobStatus.RUNNING
        correction = self.estimator.latency.correction
        aging = self.aging_rate
        keep = 1.0 - self.hysteresis
        switch = self.switch_cost_s
        parts = self._parts
        out = []
        append = out.append
        for job in jobs:
            if job.status is running:
                remaining, starved_after = parts(job)
                key = (remaining * correction * keep - switch) - aging * job.queued_s
            else:
                hit = cache.get(id(job))
                if (hit is None or hit[0] is not job or hit[1] is not job.status
                        or hit[2] != len(job.output_token_ids) or hit[3] is not job.kv
                        or hit[4] is not job.estimate):
                    hit = cache[id(job)] = (job, job.status, len(job.output_token_ids), job.kv,
                                            job.estimate, *parts(job))
                remaining, starved_after = hit[5], hit[6]
                key = remaining * correction - aging * (
                    job.queued_s + max(now_s - job.idle_since_s, 0.0))
            if now_s - job.arrival_s > starved_after:
                key -= STARVED_BOOST_S
            append(key)
        if len(cache) > 4 * len(jobs) + 1024:
            live = {id(job) for job in jobs}
            for k in [k for k in cache if k not in live]:
                del cache[k]
        return out

    def reserve_tokens(self, job: Job) -> float:
        if not self.reserve_horizon_tokens:
            return 0.0
        done = len(job.output_token_ids)
        remaining = self.estimator._remaining_tokens(done, job.sampling.max_tokens,
                                                     self.estimate_of(job))
        return min(self.reserve_fraction * remaining, self.reserve_horizon_tokens)

    def is_starved(self, job: Job, now_s: float) -> bool:
        return now_s - job.arrival_s > self._parts(job)[1]


class OraclePolicy(AlisePolicy):
    name = "oracle"
    _estimates: dict[int, LengthEstimate] = {}

    def estimate_of(self, job: Job) -> LengthEstimate:
        n = job.oracle_output_tokens
        if n is None:
            return super().estimate_of(job)
        estimate = self._estimates.get(n)
        if estimate is None:
            estimate = self._estimates[n] = LengthEstimate(mean=n, p50=n, p90=n, source="oracle")
        return estimate


POLICY_NAMES = ("fcfs", "alise", "oracle")


def make_policy(name: str, latency: LatencyModel, **kwargs) -> Policy:
    if name == "fcfs":
        return FcfsPolicy()
    if name == "alise":
        return AlisePolicy(latency, **kwargs)
    if name == "oracle":
        return OraclePolicy(latency, **kwargs)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
