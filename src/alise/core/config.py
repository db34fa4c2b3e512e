"""What decides scheduling: the policy, its knobs, the KV planner, the pace of planning.

One frozen dataclass for every place that schedules: the scheduler service holds it
(``SchedulerConfig.scheduling``), ``alise up`` hands it to its scheduler, the simulator runs the
same core with it (``SimConfig.scheduling``). Its fields are also the flags of ``alise
scheduler``, ``alise up`` and ``alise sim`` (``alise.common.entrypoint`` reads each field's type,
default and ``#:`` comment), so each default and each check is written here once.

Light on purpose (no numpy): command-line parsers import it. ``alise.core.build.make_core``
builds the core it describes.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass

from alise.core.choices import PlannerName, PolicyName


@dataclass(frozen=True)
class SchedulingConfig:
    """The policy's knobs below ``plans_ahead`` are read by the policies named in their comment
    (``alise.core.policy`` explains each rule); a knob of another policy is kept, not used."""

    #: Scheduling policy: alise (the product: shortest predicted remaining time, with the
    #: predictor's estimates), fcfs (arrival order, vLLM's), oracle (true lengths, for benchmarks).
    policy: PolicyName = "alise"
    #: Where paused jobs' KV goes: adaptive (keep, quantize, swap or drop, whichever costs
    #: least), drop (keep while it fits, else recompute: vLLM's), swap (keep, host or drop),
    #: quantize (keep, int8, int4 or drop) (None: by policy, drop for fcfs, adaptive otherwise).
    kv_planner: PlannerName | None = None
    #: A step that carries prompt chunks beside decodes costs at most this many times the decode
    #: step alone, by the workers' measured latency profile (chunks are cut to fit; 0 = no cap:
    #: only the workers' token budget limits them).
    prefill_step_ratio: float = 1.5
    #: Most plans kept in flight per worker: the worker runs step k while steps k + 1 .. k + n - 1
    #: wait and step k + n is planned, so a scheduler that stalls for up to n - 1 steps (a full
    #: garbage collection, a burst of requests, a busy CPU) does not idle the device; each plan
    #: ahead costs a new job one step before its first token (1 = lock-step: the worker waits
    #: for each plan).
    plans_ahead: int = 3
    #: Plans kept in flight while they reach the worker in time (at most plans_ahead): one more,
    #: up to plans_ahead, each time the worker is found waiting for a plan with jobs to run, one
    #: less after a run of plans in time (``alise.core.dispatch.FlightDepth``). 2 = vLLM's async
    #: scheduling: step k + 1 is planned while step k runs.
    min_plans_ahead: int = 2
    #: Every policy: a job that outran its p90 estimate is assumed to produce this many times
    #: what it has produced so far, less one (2 doubles its expected total each time it is outrun).
    overrun_growth: float = 2.0
    #: alise, oracle: a job's key falls by this many seconds per second it has waited or been
    #: paused, so a job of remaining time R overtakes a fresh one after about R / rate seconds.
    aging_rate: float = 0.03
    #: alise, oracle: a running job keeps its place unless a rival is shorter by this fraction
    #: of its remaining time (predictions are noisy; a swap on a near-tie churns memory).
    hysteresis: float = 0.3
    #: alise, oracle: ... and by this many seconds, what a preemption costs at least (None:
    #: four single-sequence steps of the latency model).
    switch_cost_s: float | None = None
    #: alise, oracle: a job whose wait so far exceeds this many times its unloaded latency
    #: (and min_starve_s) is starved and runs before all others (None: no starvation bound).
    max_slowdown: float | None = None
    #: alise, oracle: no job counts as starved before it has waited this many seconds.
    min_starve_s: float = 10.0
    #: alise, oracle: a job is admitted only if the device keeps room for each selected job's
    #: growth over its next min(reserve_fraction x estimated remaining tokens, this) tokens
    #: (0 = no growth reserve).
    reserve_horizon_tokens: int = 64
    #: alise, oracle: the share of a job's estimated remaining tokens held in reserve for it
    #: (0 = no growth reserve).
    reserve_fraction: float = 0.1
    #: alise, oracle: a waiting or paused job may displace a running one (off: shortest-first
    #: among the waiting only, for ablations).
    preemptive: bool = True

    def __post_init__(self) -> None:
        check_choices(self)
        if self.prefill_step_ratio and not self.prefill_step_ratio > 1:
            raise ValueError(f"prefill_step_ratio must be 0 (no cap) or > 1, got {self.prefill_step_ratio}")
        if self.plans_ahead < 1:
            raise ValueError(f"plans_ahead must be >= 1, got {self.plans_ahead}")
        if self.min_plans_ahead < 1:
            raise ValueError(f"min_plans_ahead must be >= 1, got {self.min_plans_ahead}")
        if not self.overrun_growth >= 1:
            raise ValueError(f"overrun_growth must be >= 1, got {self.overrun_growth}")
        for name in ("aging_rate", "min_starve_s", "reserve_horizon_tokens"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {self.hysteresis}")
        if not 0 <= self.reserve_fraction <= 1:
            raise ValueError(f"reserve_fraction must be in [0, 1], got {self.reserve_fraction}")
        if self.switch_cost_s is not None and not self.switch_cost_s >= 0:
            raise ValueError(f"switch_cost_s must be >= 0 or None, got {self.switch_cost_s}")
        if self.max_slowdown is not None and not self.max_slowdown > 0:
            raise ValueError(f"max_slowdown must be > 0 or None, got {self.max_slowdown}")


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple]:
    """Field name -> the values its ``Literal[...]`` type allows (None too when optional)."""
    allowed = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Literal:
            allowed[name] = args
        elif type(None) in args:
            [inner] = [a for a in args if a is not type(None)]
            if typing.get_origin(inner) is typing.Literal:
                allowed[name] = (*typing.get_args(inner), None)
    return allowed


def check_choices(config: object) -> None:
    """Raises ValueError naming the first field typed ``Literal[...]`` whose value is not one of
    its choices: a config's choices are written once, in its field's type."""
    # A class is hashable; typeshed types functools.cache's argument as an instance's Hashable.
    for name, allowed in _literal_fields(type(config)).items():  # type: ignore[arg-type]
        value = getattr(config, name)
        if value not in allowed:
            names = ", ".join(str(a) for a in allowed if a is not None)
            raise ValueError(f"{name} must be one of {names}{' (or None)' if None in allowed else ''}, "
                             f"got {value!r}")
