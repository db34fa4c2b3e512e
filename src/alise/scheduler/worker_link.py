"""One connected worker as the scheduler's engine sees it: its stream's outbox and its figures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from alise.core.blocks import WorkerCapacity
from alise.core.commands import HeldJob, ToWorker
from alise.core.latency_model import LatencyModel


@dataclass
class CycleTimes:
    """Where one worker's reports went on the scheduler (sums, seconds, since the last log).

    ``device_s`` is what the worker timed around its forward and sampling; ``apply_s`` the
    engine's applying of reports (and handing their tokens to the streams), ``schedule_s``
    its planning. With plans in flight ahead of the worker, neither is on the worker's
    critical path as long as both together stay under a step; the worker logs the time it
    waited for a plan."""

    reports: int = 0
    device_s: float = 0.0
    apply_s: float = 0.0
    schedule_s: float = 0.0
    plans: int = 0

    def summary(self) -> str:
        n = max(self.reports, 1)

        def ms(x: float) -> float:
            return 1e3 * x / n
        return (f"{self.reports} reports, {self.plans} plans; per report: device {ms(self.device_s):.1f} ms, "
                f"applying {ms(self.apply_s):.2f} ms, planning {ms(self.schedule_s):.2f} ms")


@dataclass
class WorkerLink:
    """One connected worker: what its hello said, and the outbox its stream's handler sends
    from, in order (``alise.core.commands.ToWorker``)."""

    capacity: WorkerCapacity
    outbox: asyncio.Queue[ToWorker]
    model: str = ""
    device: str = ""
    connected_at_s: float = field(default_factory=time.monotonic)
    welcomed: bool = False            # its answer to the welcome (step 0) has come back
    last_step_s: float = 0.0
    num_steps: int = 0
    times: CycleTimes = field(default_factory=CycleTimes)
    latency_profile: LatencyModel | None = None  # what the worker measured on its device
    held: list[HeldJob] = field(default_factory=list)  # jobs it kept while it had no scheduler
    held_from: str = ""  # the scheduler_id they ran under
    last_census_s: float = 0.0

    @property
    def worker_id(self) -> str:
        return self.capacity.worker_id
