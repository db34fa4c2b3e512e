"""What the scheduler says about itself: ``GetStatus``, the state gauges of its metrics, and
a periodic log line of each worker's cycle times.

It reads the engine's state (the core, the worker links) and changes none of it but the
cycle-time sums it logs and starts over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from alise.common.metrics import running_loop
from alise.core.census import Disagreements
from alise.core.job import JobStatus
from alise.core.scheduler import WorkerView
from alise.scheduler.engine import SchedulerEngine
from alise.scheduler.worker_link import CycleTimes

logger = logging.getLogger(__name__)


class EngineStatus:
    def __init__(self, engine: SchedulerEngine, *, log_cycle_times_s: float = 30.0) -> None:
        self.engine = engine
        #: Every this many seconds, log each worker's report times (and start them over).
        self.log_cycle_times_s = log_cycle_times_s
        self._times_logged_s = time.monotonic()
        # The core changes on the event loop; a scrape from the exporter's thread reads it there.
        engine.metrics.watch(self._state_metrics, loop=running_loop())

    def snapshot(self) -> dict:
        """The scheduler, its queue and each worker, as ``GetStatus`` answers."""
        engine, core = self.engine, self.engine.core
        workers = []
        for link in engine.links.values():
            view = core.workers.get(link.worker_id)
            cap = link.capacity
            workers.append(dict(
                worker_id=link.worker_id, model=link.model, device=link.device,
                tensor_parallel_size=cap.tensor_parallel_size,
                block_size=cap.block_size, num_device_blocks=cap.num_device_blocks,
                num_free_device_blocks=view.num_free_device_blocks if view else 0,
                num_host_blocks=cap.num_host_blocks,
                num_free_host_blocks=view.num_free_host_blocks if view else 0,
                num_running=view.num_with_status(JobStatus.RUNNING) if view else 0,
                num_paused=view.num_with_status(JobStatus.PAUSED) if view else 0,
                last_step_ms=link.last_step_s * 1e3, num_steps=link.num_steps,
                connected_s=time.monotonic() - link.connected_at_s, **_disagreements(view)))
        return dict(
            policy=core.policy.name, workers=workers, num_waiting=len(core.waiting),
            num_running=core.num_with_status(JobStatus.RUNNING),
            num_paused=core.num_with_status(JobStatus.PAUSED),
            num_finished=core.num_finished, uptime_s=time.monotonic() - engine.started_s,
            num_preemptions=sum(core.preemptions.values()),
            preemptions_by_action=dict(core.preemptions),
            num_admitted_tokens=core.prefill.num_admitted_tokens, num_cached_tokens=core.prefill.num_cached_tokens,
            num_prefill_tokens=core.prefill.num_computed_tokens)

    def _state_metrics(self) -> Iterator[tuple]:
        core = self.engine.core
        yield ("alise_queue_waiting", "Jobs waiting for a worker", [], [([], len(core.waiting))])
        yield ("alise_jobs", "Jobs on workers by state", ["state"],
               [(["running"], core.num_with_status(JobStatus.RUNNING)),
                (["paused"], core.num_with_status(JobStatus.PAUSED))])
        yield ("alise_preemptions", "Preemptions by KV action since start", ["action"],
               [([action], n) for action, n in core.preemptions.items()])
        yield ("alise_prefill_tokens", "Tokens admitted to workers since start, those read from their prefix "
               "caches, and those prefills computed", ["kind"],
               [(["admitted"], core.prefill.num_admitted_tokens), (["cached"], core.prefill.num_cached_tokens),
                (["computed"], core.prefill.num_computed_tokens)])
        yield ("alise_workers", "Connected workers", [], [([], len(self.engine.links))])
        blocks = []
        for worker_id, view in core.workers.items():
            cap = view.capacity
            blocks += [([worker_id, "device", "free"], view.num_free_device_blocks),
                       ([worker_id, "device", "used"], cap.num_device_blocks - view.num_free_device_blocks),
                       ([worker_id, "host", "free"], view.num_free_host_blocks),
                       ([worker_id, "host", "used"], cap.num_host_blocks - view.num_free_host_blocks)]
        yield ("alise_kv_blocks", "KV blocks per worker", ["worker", "where", "state"], blocks)
        yield ("alise_worker_disagreements", "What censuses of a worker's jobs found since it connected: "
               "jobs it held unknown here (ghost, aborted), jobs counted here it did not hold (missing, "
               "recomputed), censuses with more device blocks in use than planned (block_deficit)",
               ["worker", "kind"],
               [([worker_id, kind], n) for worker_id, view in core.workers.items()
                for kind, n in (("ghost", view.disagreements.num_ghosts),
                                ("missing", view.disagreements.num_missing),
                                ("block_deficit", view.disagreements.num_block_deficits))])

    async def run(self) -> None:
        """Logs each worker's cycle times every ``log_cycle_times_s`` (looked at every second)."""
        while True:
            await asyncio.sleep(min(self.log_cycle_times_s, 1.0))
            now = time.monotonic()
            if now - self._times_logged_s >= self.log_cycle_times_s:
                self.log_cycle_times(now)

    def log_cycle_times(self, now: float) -> None:
        for link in self.engine.links.values():
            if link.times.reports:
                logger.info("worker %s, last %.0f s: %s", link.worker_id,
                            now - self._times_logged_s, link.times.summary())
            link.times = CycleTimes()
        self._times_logged_s = now


def _disagreements(view: WorkerView | None) -> dict[str, int]:
    """A worker's census totals, as status reports them."""
    d = view.disagreements if view is not None else Disagreements()
    return dict(num_censuses=d.num_censuses, num_ghost_jobs=d.num_ghosts, num_missing_jobs=d.num_missing,
                num_block_deficits=d.num_block_deficits)
