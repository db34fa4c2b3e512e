"""Which worker a waiting job goes to, when several are connected.

A waiting job is routed once (when it arrives, or when the worker it was routed to or ran on
leaves) to the worker where it is expected to finish first:

    finish on w = the job's own remaining time + w's backlog / w's parallelism

where w's backlog is the estimated remaining time of every job on w plus that of the waiting
jobs routed to w, and its parallelism the number of jobs it runs at once (at least 1), less
the prefill the job would save on w, whose prefix cache holds its first tokens (so among
workers that can take it alike, the one holding its prefix wins).
Workers that cannot hold the job are skipped; ties go to the lower worker id. Only that worker
takes the job, unless another worker has nothing at all to do, which then takes it rather than
idle.

Cost: a routing pass reads each worker's on-device backlog once (one ``bincount`` over the
job table) and then routes the new jobs one by one against per-worker sums it updates as it
goes: O(new jobs x workers), never a scan of the queue per job.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from alise.core.table import JobTable

NO_ROUTE = -1


class Router:
    def __init__(self, table: JobTable) -> None:
        self.table = table
        #: job id -> (worker index, the remaining time it added to that worker's queued sum)
        self._routed: dict[str, tuple[int, float]] = {}
        #: worker index -> estimated remaining time of the waiting jobs routed to it
        self.queued_s: dict[int, float] = {}
        #: worker index -> worker id (the connected ones)
        self.worker_ids: dict[int, str] = {}
        self.max_model_len: dict[int, int] = {}

    # ----------------------------------------------------------------- workers

    def add_worker(self, index: int, worker_id: str, max_model_len: int) -> None:
        self.worker_ids[index] = worker_id
        self.max_model_len[index] = max_model_len
        self.queued_s[index] = 0.0

    def remove_worker(self, index: int) -> None:
        self.worker_ids.pop(index, None)
        self.max_model_len.pop(index, None)
        self.queued_s.pop(index, None)
        for job_id in [j for j, (w, _) in self._routed.items() if w == index]:
            self.unroute(job_id)

    # ----------------------------------------------------------------- jobs

    def route_of(self, job_id: str) -> str | None:
        routed = self._routed.get(job_id)
        return None if routed is None else self.worker_ids.get(routed[0])

    def assign(self, job_id: str, index: int, remaining_s: float = 0.0) -> None:
        self.unroute(job_id)
        self._routed[job_id] = (index, remaining_s)
        self.queued_s[index] = self.queued_s.get(index, 0.0) + remaining_s
        slot = self.table.slot_of.get(job_id)
        if slot is not None:
            self.table.route[slot] = index

    def unroute(self, job_id: str) -> None:
        routed = self._routed.pop(job_id, None)
        if routed is None:
            return
        index, remaining = routed
        if index in self.queued_s:
            self.queued_s[index] = max(self.queued_s[index] - remaining, 0.0)
        slot = self.table.slot_of.get(job_id)
        if slot is not None:
            self.table.route[slot] = NO_ROUTE

    def route_new(self, waiting: np.ndarray, correction: float,
                  saved_s: Callable[[int, int], float] | None = None) -> None:
        """Routes the waiting jobs at slots ``waiting`` that have no route yet; ``saved_s(slot,
        worker index)``: seconds of prefill the job saves there (its cached prefix)."""
        table = self.table
        new = waiting[table.route[waiting] == NO_ROUTE]
        if not len(new) or not self.worker_ids:
            return
        indices = sorted(self.worker_ids, key=self.worker_ids.__getitem__)
        placed = np.flatnonzero(table.owner >= 0)
        table.fill_remaining(placed)
        table.fill_remaining(new)
        size = max(indices) + 1
        owners = table.owner[placed]
        load = np.bincount(owners, weights=table.remaining_base_s[placed] * correction, minlength=size)
        parallel = np.bincount(owners[table.is_running[placed]], minlength=size)
        backlog = {w: float(load[w]) + self.queued_s[w] for w in indices}
        for slot in new[np.argsort(table.tie_label[new], kind="stable")].tolist():
            own = float(table.remaining_base_s[slot]) * correction
            best = None
            for w in indices:
                if table.num_tokens[slot] >= self.max_model_len[w]:
                    continue
                finish = own + backlog[w] / max(int(parallel[w]), 1)
                if saved_s is not None:
                    finish -= saved_s(slot, w)
                if best is None or finish < best[0]:
                    best = (finish, w)
            w = best[1] if best is not None else indices[0]
            self.assign(table.jobs[slot].job_id, w, own)
            backlog[w] += own
