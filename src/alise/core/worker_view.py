"""The scheduler core's picture of one connected worker (``WorkerView``): the jobs it holds,
its plans in flight, the aborts on their way to it, and its prefix cache's mirror.

Its free blocks are the core's exact count once the planned steps have run: a running job
holds its computed positions' blocks, a paused one what its KV place costs, and shared prefix
blocks count once (``alise.core.blocks``, ``alise.core.prefix_mirror``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from alise.core.blocks import WorkerCapacity, blocks_for, held_device_blocks, held_host_blocks
from alise.core.census import Disagreements
from alise.core.job import Job, JobStatus
from alise.core.prefix_mirror import PrefixMirror
from alise.core.reports import InFlight


@dataclass
class WorkerView:
    """The core's picture of one connected worker."""

    capacity: WorkerCapacity
    index: int
    jobs: dict[str, Job] = field(default_factory=dict)
    #: Jobs to abort on the worker at its next step boundary, ahead of any plan.
    aborts: list[str] = field(default_factory=list)
    #: Aborts sent: job id -> the last plan sent before the abort (``alise.core.census``).
    aborting: dict[str, int] = field(default_factory=dict)
    in_flight: deque[InFlight] = field(default_factory=deque)
    next_step_id: int = 1
    disagreements: Disagreements = field(default_factory=Disagreements)
    #: The worker's prefix cache as the core mirrors it (None: the worker caches nothing).
    prefix: PrefixMirror | None = None

    @property
    def worker_id(self) -> str:
        return self.capacity.worker_id

    @property
    def num_free_device_blocks(self) -> int:
        """Device blocks free once the planned steps have run (the core's exact count: a job
        that runs holds its computed positions' blocks; a paused one what its KV place costs;
        shared prefix blocks count once)."""
        bs = self.capacity.block_size
        used = sum(blocks_for(job.num_private_tokens, bs) if job.status is JobStatus.RUNNING
                   else held_device_blocks(job, bs) for job in self.jobs.values())
        return self.capacity.num_device_blocks - used - self.num_shared_blocks

    @property
    def num_shared_blocks(self) -> int:
        return self.prefix.num_shared_in_use if self.prefix is not None else 0

    @property
    def num_free_host_blocks(self) -> int:
        bs = self.capacity.block_size
        return self.capacity.num_host_blocks - sum(held_host_blocks(job, bs) for job in self.jobs.values())

    def num_with_status(self, status: JobStatus) -> int:
        return sum(1 for job in self.jobs.values() if job.status is status)
