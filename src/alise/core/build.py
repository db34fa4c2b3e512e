"""The scheduler core a :class:`SchedulingConfig` describes: the service and the simulator both
build theirs here (``alise.core.config`` stays light, for the command-line parsers)."""

from __future__ import annotations

from alise.core import scheduler
from alise.core.config import SchedulingConfig
from alise.core.latency_model import LatencyModel
from alise.core.memory_planner import MemoryPlanner, make_memory_planner
from alise.core.policy import make_policy


def make_core(config: SchedulingConfig, latency: LatencyModel,
              memory: MemoryPlanner | None = None) -> scheduler.SchedulerCore:
    """The scheduler core ``config`` describes, pricing with ``latency``; ``memory`` replaces
    the planner ``config.kv_planner`` names (a planner with costs of its own, for benchmarks)."""
    if memory is None and config.kv_planner is not None:
        memory = make_memory_planner(config.kv_planner, latency)
    # Read from the module at call time: a benchmark may stand another class in for it.
    return scheduler.SchedulerCore(make_policy(config, latency), memory,
                                   prefill_step_ratio=config.prefill_step_ratio)
