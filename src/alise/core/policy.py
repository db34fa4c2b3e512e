"""Scheduling policies: how jobs are keyed and compared, and nothing else.

A policy answers "which job should run sooner?" as a sort key over arrays of candidates
(lower runs sooner; ties go to the earlier arrival, then the job id). The mechanism
(``alise.core.scheduler``: budgets, selection, preemption, memory, routing) never names a
policy class; it reads the interface below:

* ``preemptive``      may a waiting or paused job displace a running one?
* ``backfill``        may a job that fits run ahead of an earlier one that does not?
* ``estimate_of(job)`` the length estimate the policy ranks a job by (the oracle: the truth)
* ``keys(c, now_s)``  one key per candidate of ``c`` (:class:`Candidates`, numpy columns)
* ``reserve_tokens(c)`` KV tokens to hold back for each candidate's growth (default none)

Policies:

* ``fcfs``   vLLM's behaviour: arrival order, no preemption on arrival, no skipping ahead.
* ``alise``  shortest estimated remaining execution time first, preemptive, with the
             re-estimation and aging rules below.
* ``oracle`` the same with the true output lengths: the bound on what prediction can buy.

Misprediction rule (:class:`RemainingTimeEstimator`): a job is charged its point estimate
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
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from alise.core.config import SchedulingConfig
from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel


class JobColumns(Protocol):
    """The columns of the core's job table (``alise.core.table.JobTable``) a step ranks by."""

    is_running: np.ndarray
    arrival_s: np.ndarray
    queued_s: np.ndarray
    idle_since_s: np.ndarray
    num_prompt_tokens: np.ndarray
    num_tokens: np.ndarray
    remaining_base_s: np.ndarray
    remaining_tokens: np.ndarray

    def fill_remaining(self, slots: np.ndarray) -> None: ...


#: Used when a job has no estimate (predictor down and nothing observed yet).
DEFAULT_ESTIMATE = LengthEstimate(mean=128.0, p50=128.0, p90=512.0, source="prior")

#: The knobs' defaults, for a policy built without a config of its own (tests).
DEFAULT_CONFIG = SchedulingConfig()

#: Subtracted from the key of a starved job: it runs before every job that is not starved.
STARVED_BOOST_S = 1e6

#: Up to this many rows of a remaining-time fill priced with a feed (jobs in a prefill, most
#: fills have one to three) are priced one by one rather than by numpy calls on a few rows.
_FEW_FEEDS = 4


class _Gathered:
    """A column of :class:`Candidates`, computed on its first read and kept in the instance
    (``functools.cached_property`` without its lock: one thread plans)."""

    def __init__(self, func: Callable[[Candidates], np.ndarray]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __get__(self, obj: Candidates | None, owner: type | None = None) -> np.ndarray:
        if obj is None:
            raise AttributeError(f"{self.name} is read from candidates, not their class")
        # setattr, not ``obj.__dict__``: the instance's attributes stay inline (CPython reads
        # those faster, and the value shadows this descriptor, which has no ``__set__``).
        value = self.func(obj)
        setattr(obj, self.name, value)
        return value


class Candidates:
    """Jobs a step ranks, as aligned numpy columns (one row a job), each gathered from the
    core's job table on its first read: a policy pays only for the columns it reads (fcfs
    reads arrival times alone), and remaining times are brought up to date only when read."""

    def __init__(self, table: JobColumns, slots: np.ndarray) -> None:
        self._table = table
        self._slots = slots
        self._is_filled = False

    def __len__(self) -> int:
        return len(self._slots)

    @_Gathered
    def running(self) -> np.ndarray:
        """bool: in the worker's running batch."""
        return self._table.is_running[self._slots]

    @_Gathered
    def arrival_s(self) -> np.ndarray:
        return self._table.arrival_s[self._slots]

    @_Gathered
    def queued_s(self) -> np.ndarray:
        """Waited or paused so far (closed spells)."""
        return self._table.queued_s[self._slots]

    @_Gathered
    def idle_since_s(self) -> np.ndarray:
        """Start of the current wait (idle jobs; +inf for a running one)."""
        return self._table.idle_since_s[self._slots]

    @_Gathered
    def prompt_tokens(self) -> np.ndarray:
        return self._table.num_prompt_tokens[self._slots]

    @_Gathered
    def generated(self) -> np.ndarray:
        """Output tokens once the planned steps have run."""
        return self._table.num_tokens[self._slots] - self.prompt_tokens

    @_Gathered
    def remaining_s(self) -> np.ndarray:
        """Estimated remaining execution time before the correction."""
        self._fill()
        return self._table.remaining_base_s[self._slots]

    @_Gathered
    def tokens_left(self) -> np.ndarray:
        """Estimated remaining output tokens."""
        self._fill()
        return self._table.remaining_tokens[self._slots]

    def _fill(self) -> None:
        """Brings the remaining times up to date (once: the table does not change while a
        step ranks)."""
        if not self._is_filled:
            self._table.fill_remaining(self._slots)
            self._is_filled = True


@dataclass
class RemainingTimeEstimator:
    """Estimated remaining execution time of a job, from its length estimate.

    Every figure comes from :meth:`remaining_base_arrays`, which takes numpy columns (the
    scheduler's path, over all candidates at once) or plain numbers.
    """

    latency: LatencyModel
    overrun_growth: float = SchedulingConfig.overrun_growth
    #: Batch size used to share a decode step's fixed cost between members.
    typical_batch: int = 8

    def remaining_tokens_arrays(self, done, max_tokens, mean, p90):
        """Remaining output tokens under the misprediction rule (at least 1, at most the cap)."""
        # The point estimate, else p90 (the one to count down from), else the growth rule.
        target = np.where(done < mean, mean, p90)
        remaining = np.where(done < target, target - done, done * (self.overrun_growth - 1.0))
        return np.maximum(np.minimum(remaining, max_tokens - done), 1.0)

    def remaining_base_arrays(self, done, num_tokens, num_computed, max_tokens, mean, p90):
        """(remaining seconds before the latency correction, remaining tokens).

        A feed of every uncomputed token when more than one is left (a prompt not yet in, or a
        recompute after a drop), then the remaining tokens at the marginal decode cost of one
        member of a typical batch, at the mean context over the rest of the job."""
        lat = self.latency
        tokens = self.remaining_tokens_arrays(done, max_tokens, mean, p90)
        per_token = lat.decode_member_base_s(num_tokens + tokens / 2, self.typical_batch)
        seconds = tokens * per_token
        if not isinstance(num_tokens, np.ndarray):
            feed = lat.recompute_base_s(num_tokens, num_computed) if num_tokens - num_computed > 1 else 0.0
            return feed + seconds, tokens
        # Mostly decoding jobs (one token left): the feed is priced only where it is not 0.
        fed = (num_tokens - num_computed > 1).nonzero()[0]
        if len(fed) > _FEW_FEEDS:  # ``seconds`` is a new array
            seconds[fed] += lat.recompute_base_s(num_tokens[fed], num_computed[fed])
        else:  # the same arithmetic on plain numbers (IEEE doubles both), cheaper for a few rows
            recompute_base_s = lat.recompute_base_s
            for i in fed.tolist():
                seconds[i] += recompute_base_s(num_tokens.item(i), num_computed.item(i))
        return seconds, tokens

    # Per-job forms (tests, logs): the same arithmetic on one job.

    def remaining_output_tokens(self, job: Job, estimate: LengthEstimate) -> float:
        return float(self.remaining_tokens_arrays(job.num_generated, job.sampling.max_tokens,
                                                  estimate.mean, estimate.p90))

    def remaining_base_s(self, job: Job, estimate: LengthEstimate) -> float:
        seconds, _ = self.remaining_base_arrays(job.num_generated, job.num_tokens, job.num_computed_tokens,
                                                job.sampling.max_tokens, estimate.mean, estimate.p90)
        return float(seconds)

    def remaining_s(self, job: Job, estimate: LengthEstimate) -> float:
        return self.remaining_base_s(job, estimate) * self.latency.correction


class Policy(abc.ABC):
    name = "base"
    preemptive = False
    backfill = False

    def __init__(self, latency: LatencyModel | None = None,
                 config: SchedulingConfig = DEFAULT_CONFIG) -> None:
        #: The latency model remaining times are priced with (None: the core's default).
        self.latency = latency
        #: The misprediction rule's growth factor (:class:`RemainingTimeEstimator`).
        self.overrun_growth = config.overrun_growth

    def estimate_of(self, job: Job) -> LengthEstimate:
        return job.estimate or DEFAULT_ESTIMATE

    @abc.abstractmethod
    def keys(self, c: Candidates, now_s: float) -> np.ndarray:
        """Sort keys of the candidates ``c`` (lower runs sooner)."""

    def reserve_tokens(self, c: Candidates) -> np.ndarray | None:
        """KV tokens to hold back for each candidate's growth over the next steps when
        admitting others beside it; None: admit whatever fits now (vLLM's rule)."""
        return None

    def latency_changed(self) -> None:
        """The latency model's coefficients were replaced; drop anything priced with the old."""
        return None


class FcfsPolicy(Policy):
    name = "fcfs"

    def keys(self, c: Candidates, now_s: float) -> np.ndarray:
        return c.arrival_s


class AlisePolicy(Policy):
    """Shortest estimated remaining time first, preemptive, with hysteresis and a starvation bound.

    Key of a job (seconds, lower runs sooner)::

        waiting or paused:  R(job) - aging_rate * waited
        running:            R(job) * (1 - hysteresis) - switch_cost_s - aging_rate * waited
        starved (either):   the above - STARVED_BOOST_S

    ``R`` is the remaining execution time (:class:`RemainingTimeEstimator`: the misprediction
    rule, plus a feed of the whole uncomputed sequence when more than one token is left),
    ``waited`` the time the job has spent waiting or paused so far. A running job keeps its
    place unless a rival is shorter by both a fraction (``hysteresis``: predictions are noisy,
    and a swap on a near-tie churns memory for nothing) and an absolute margin
    (``switch_cost_s``: a preemption costs at least a step).

    Starvation rule: a job is *starved* once its age (now - arrival) exceeds ``max_slowdown``
    times its expected total output (generated + estimated remaining tokens) at the unloaded
    cost of a token (``step_s(1, prompt)``), i.e. once its normalized latency so far is
    ``max_slowdown`` times the unloaded one, and at least ``min_starve_s``. Starved jobs run
    before all others, among themselves by the same key (off by default: ``max_slowdown=None``).
    Linear aging (``aging_rate``): a job of remaining time R overtakes a fresh job after about
    R / aging_rate seconds of waiting.

    Growth reserve: a job is admitted or resumed only if, beside the blocks every selected job
    needs now, the device keeps room for each selected job's growth over the next
    ``min(reserve_fraction * its estimated remaining tokens, reserve_horizon_tokens)`` tokens,
    never past the whole cache (``alise.core.admission.growth_blocks``).
    Without it, shortest-first admits every short newcomer that fits *now*, the batch then
    outgrows the cache within a few steps, and the core pauses its lowest-priority job,
    usually a long one with a large context, whose KV is dropped and recomputed later.

    Every knob named here is a field of :class:`~alise.core.config.SchedulingConfig`, with its
    default and its check.
    """

    name = "alise"
    backfill = True

    def __init__(self, latency: LatencyModel, config: SchedulingConfig = DEFAULT_CONFIG) -> None:
        super().__init__(latency, config)
        self.aging_rate = config.aging_rate
        self.hysteresis = config.hysteresis
        self.max_slowdown = config.max_slowdown
        self.min_starve_s = config.min_starve_s
        #: 0 when either is 0: no reserve.
        self.reserve_horizon_tokens = config.reserve_horizon_tokens if config.reserve_fraction > 0 else 0
        self.reserve_fraction = config.reserve_fraction
        self.preemptive = config.preemptive
        self._switch_cost_s = config.switch_cost_s

    @property
    def switch_cost_s(self) -> float:
        """A running job keeps its place unless a rival is shorter by more than this. Default:
        four single-sequence steps of the latency model (which may be replaced when a worker
        brings its profile)."""
        if self._switch_cost_s is not None:
            return self._switch_cost_s
        assert self.latency is not None  # make_policy gives this policy its latency model
        return 4 * self.latency.step_s(1, 0)

    def keys(self, c: Candidates, now_s: float) -> np.ndarray:
        assert self.latency is not None  # make_policy gives this policy its latency model
        running = c.running
        corrected = c.remaining_s * self.latency.correction
        # A running job has waited its closed spells (``queued_s``) alone: its ``idle_since_s``
        # is +inf, which ``max(now - inf, 0)`` makes 0.
        aged = np.maximum(now_s - c.idle_since_s, 0.0)
        aged += c.queued_s
        aged *= self.aging_rate
        keys = np.where(running, corrected * (1.0 - self.hysteresis) - self.switch_cost_s, corrected)
        keys -= aged
        if self.max_slowdown is not None:
            keys = keys - STARVED_BOOST_S * self.starved(c, now_s)
        return keys

    def starved(self, c: Candidates, now_s: float) -> np.ndarray:
        """Which candidates are starved (see the class doc)."""
        if self.max_slowdown is None:
            return np.zeros(len(c), dtype=bool)
        lat = self.latency
        assert lat is not None  # make_policy gives this policy its latency model
        unloaded = lat.step_s(1, 0) + lat.c_ctx_s * lat.correction * c.prompt_tokens
        threshold = np.maximum(self.max_slowdown * (c.generated + c.tokens_left) * unloaded, self.min_starve_s)
        return (now_s - c.arrival_s) > threshold

    def reserve_tokens(self, c: Candidates) -> np.ndarray | None:
        if not self.reserve_horizon_tokens:
            return None
        return np.minimum(self.reserve_fraction * c.tokens_left, self.reserve_horizon_tokens)


class OraclePolicy(AlisePolicy):
    """``alise`` ranking by the true output length (trace replay knows it)."""

    name = "oracle"

    def estimate_of(self, job: Job) -> LengthEstimate:
        n = job.oracle_output_tokens
        if n is None:
            return super().estimate_of(job)
        return _exact_estimate(n)


@functools.lru_cache(maxsize=4096)
def _exact_estimate(n: int) -> LengthEstimate:
    """The estimate of a job of known length ``n`` (frozen, so shared: the table reads it on
    every change of the job)."""
    return LengthEstimate(mean=n, p50=n, p90=n, source="oracle")


#: The class of each policy name (``alise.core.choices.PolicyName``).
POLICIES: dict[str, type[Policy]] = {"fcfs": FcfsPolicy, "alise": AlisePolicy, "oracle": OraclePolicy}


def make_policy(config: SchedulingConfig, latency: LatencyModel) -> Policy:
    """The policy ``config.policy`` names, with ``config``'s knobs (checked by the config)."""
    return POLICIES[config.policy](latency, config)

