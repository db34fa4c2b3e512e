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


class FcfsPolicy(Policy):
    name = "fcfs"

    def key(self, job: Job, now_s: float) -> float:
        return job.arrival_s


@dataclass
class RemainingTimeEstimator:
    """Estimated remaining execution time of a job, from its length estimate."""

    latency: LatencyModel
    overrun_growth: float = 2.0
    #: Batch size used to share a decode step's fixed cost between members.
    typical_batch: int = 8

    def remaining_output_tokens(self, job: Job, estimate: LengthEstimate) -> float:
        done = job.num_output_tokens
        limit = job.sampling.max_tokens
        if done < estimate.mean:
            remaining = estimate.mean - done
        elif done < estimate.p90:
            remaining = estimate.p90 - done
        else:
            remaining = done * (self.overrun_growth - 1.0)
        return max(min(remaining, limit - done), 1.0)

    def remaining_s(self, job: Job, estimate: LengthEstimate) -> float:
        tokens = self.remaining_output_tokens(job, estimate)
        prefill = 0.0
        if job.kv is KvPlace.NONE:
            prefill = self.latency.prefill_s(job.num_tokens)
        context = job.num_tokens + tokens / 2
        return prefill + tokens * self.latency.decode_token_s(context, self.typical_batch)


class AlisePolicy(Policy):
    name = "alise"
    preemptive = True
    backfill = True

    def __init__(self, latency: LatencyModel, *, aging_rate: float = 0.05,
                 switch_cost_s: float | None = None, overrun_growth: float = 2.0) -> None:
        if aging_rate < 0:
            raise ValueError(f"aging_rate must be >= 0, got {aging_rate}")
        self.estimator = RemainingTimeEstimator(latency, overrun_growth=overrun_growth)
        self.aging_rate = aging_rate
        # A running job keeps its place unless a rival is shorter by more than this: a
        # preemption costs at least a step and churns memory.
        self.switch_cost_s = (
            switch_cost_s if switch_cost_s is not None else 4 * latency.step_s(1, 0)
        )

    def estimate_of(self, job: Job) -> LengthEstimate:
        return job.estimate or DEFAULT_ESTIMATE

    def key(self, job: Job, now_s: float) -> float:
        remaining = self.estimator.remaining_s(job, self.estimate_of(job))
        waited = job.queued_s
        if job.status is not JobStatus.RUNNING:
            waited += max(now_s - job.idle_since_s, 0.0)
        else:
            remaining -= self.switch_cost_s
        return remaining - self.aging_rate * waited


class OraclePolicy(AlisePolicy):
    name = "oracle"

    def estimate_of(self, job: Job) -> LengthEstimate:
        if job.oracle_output_tokens is None:
            return super().estimate_of(job)
        n = float(job.oracle_output_tokens)
        return LengthEstimate(mean=n, p50=n, p90=n, source="oracle")


POLICY_NAMES = ("fcfs", "alise", "oracle")


def make_policy(name: str, latency: LatencyModel, **kwargs) -> Policy:
    if name == "fcfs":
        return FcfsPolicy()
    if name == "alise":
        return AlisePolicy(latency, **kwargs)
    if name == "oracle":
        return OraclePolicy(latency, **kwargs)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
