"""The scheduler core: which jobs run on which worker, step by step.

Pure Python: no gRPC, no torch. The scheduler service, the tests and the simulator all
drive this same class. Each worker is driven lock-step: after it reports step k, the core
plans step k+1 for it (``schedule``), in four named phases:

1. ``_order``        sort the candidates (this worker's jobs + the global waiting queue)
                     by the policy's key; non-preemptive policies put running jobs first.
2. ``_select``       walk that order, taking jobs while the sequence budget, the token
                     budget and the device blocks allow (``blocks_for(num_tokens)`` each);
                     stop at the first misfit unless the policy backfills.
3. ``_plan_memory``  every job on the worker that was not selected gets a KV place from
                     the memory planner (``alise.core.memory_planner``): keep, int8, int4,
                     host or drop, by its expected wait, within the device blocks the
                     selected ones leave and the host blocks; running ones are paused.
4. ``_start``        admit or resume the selected jobs that are not running.

Block accounting is exact (the worker allocates by the same formulas), so a plan never
asks the worker for more blocks than it has.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from alise.core.blocks import HOST_PLACES, WorkerCapacity, blocks_for, held_host_blocks
from alise.core.commands import (
    Abort,
    Admit,
    Command,
    KvAction,
    Pause,
    Resume,
    StepPlan,
    StepReport,
    TokenEvent,
)
from alise.core.job import FinishReason, Job, JobStatus, KvPlace
from alise.core.latency_model import LatencyModel
from alise.core.memory_planner import KvMove, MemoryPlanner, expected_waits, make_memory_planner
from alise.core.policy import DEFAULT_ESTIMATE, Policy, RemainingTimeEstimator

logger = logging.getLogger(__name__)


@dataclass
class WorkerView:
    """The core's picture of one connected worker."""

    capacity: WorkerCapacity
    jobs: dict[str, Job] = field(default_factory=dict)
    pending: list[Command] = field(default_factory=list)
    next_step_id: int = 1
    num_free_device_blocks: int = 0
    num_free_host_blocks: int = 0

    @property
    def worker_id(self) -> str:
        return self.capacity.worker_id

    def num_with_status(self, status: JobStatus) -> int:
        return sum(1 for job in self.jobs.values() if job.status is status)


class SchedulerCore:
    def __init__(self, policy: Policy, memory: MemoryPlanner | None = None) -> None:
        self.policy = policy
        estimator = getattr(policy, "estimator", None) or RemainingTimeEstimator(LatencyModel())
        estimate_of = getattr(policy, "estimate_of", lambda job: job.estimate or DEFAULT_ESTIMATE)
        self._remaining_s = lambda job: estimator.remaining_s(job, estimate_of(job))
        # fcfs is vLLM's behaviour: recompute preemption. The speculative policies plan KV moves.
        self.memory = memory or make_memory_planner("drop" if policy.name == "fcfs" else "adaptive",
                                                    estimator.latency)
        #: KV moves by kind (keep, int8, int4, swap, swap-int8, swap-int4, drop, prefetch).
        self.kv_moves: Counter[str] = Counter()
        self.jobs: dict[str, Job] = {}
        self.waiting: dict[str, Job] = {}
        self.workers: dict[str, WorkerView] = {}
        self.num_finished = 0
        self.preemptions: Counter[str] = Counter()
        #: job id -> worker id chosen for a waiting job (several workers only).
        self.routes: dict[str, str] = {}

    # ----------------------------------------------------------------- membership

    def add_worker(self, capacity: WorkerCapacity) -> WorkerView:
        if capacity.worker_id in self.workers:
            raise ValueError(f"worker {capacity.worker_id!r} is already connected")
        view = WorkerView(capacity, num_free_device_blocks=capacity.num_device_blocks,
                          num_free_host_blocks=capacity.num_host_blocks)
        self.workers[capacity.worker_id] = view
        return view

    def remove_worker(self, worker_id: str, now_s: float) -> list[Job]:
        """Hands a lost worker's jobs back to the waiting queue; they recompute elsewhere."""
        view = self.workers.pop(worker_id, None)
        if view is None:
            return []
        moved = list(view.jobs.values())
        for job in moved:
            self._to_waiting(job, now_s)
        return moved

    def submit(self, job: Job) -> None:
        if job.job_id in self.jobs:
            raise ValueError(f"job {job.job_id!r} already exists")
        self.jobs[job.job_id] = job
        self.waiting[job.job_id] = job

    def cancel(self, job_id: str, now_s: float) -> bool:
        """Aborts a job wherever it is. Its worker frees it at the start of its next step."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if job.worker_id is not None and job.worker_id in self.workers:
            view = self.workers[job.worker_id]
            view.jobs.pop(job_id, None)
            view.pending.append(Abort(job_id))
        self.waiting.pop(job_id, None)
        self._finish(job, FinishReason.ABORTED, now_s)
        return True

    # ----------------------------------------------------------------- reports

    def apply_report(self, worker_id: str, report: StepReport, now_s: float) -> list[TokenEvent]:
        view = self.workers[worker_id]
        view.num_free_device_blocks = report.num_free_device_blocks
        view.num_free_host_blocks = report.num_free_host_blocks
        events = []
        for out in report.outputs:
            job = view.jobs.get(out.job_id)
            if job is None:
                continue  # cancelled while the step ran; the abort is already queued
            index = job.num_output_tokens
            job.output_token_ids.extend(out.token_ids)
            if out.token_ids and job.first_token_s is None:
                job.first_token_s = now_s
            if out.num_tokens != job.num_tokens:
                raise ValueError(
                    f"worker {worker_id}: job {job.job_id} holds {out.num_tokens} tokens, "
                    f"scheduler counts {job.num_tokens}")
            events.append(TokenEvent(job.job_id, list(out.token_ids), index, out.finish_reason))
            if out.finish_reason is not None:
                view.jobs.pop(job.job_id, None)
                self._finish(job, out.finish_reason, now_s)
        for refusal in report.refused:
            self._undo_refused(view, refusal.job_id, refusal.command, now_s)
        return events

    def _undo_refused(self, view: WorkerView, job_id: str, command: str, now_s: float) -> None:
        job = view.jobs.get(job_id)
        if job is None:
            return
        logger.warning("worker %s refused %s of %s", view.worker_id, command, job_id)
        if command == "admit":
            view.jobs.pop(job_id)
            self._to_waiting(job, now_s)
        elif command == "resume":
            job.status = JobStatus.PAUSED
        elif command == "pause":
            # The worker paused the job but could not move its KV as told: make the state
            # certain again by dropping whatever it holds before anything else next step.
            job.status = JobStatus.PAUSED
            job.kv = KvPlace.NONE
            view.pending.append(Pause(job_id, KvAction.DROP))

    # ----------------------------------------------------------------- planning

    def schedule(self, worker_id: str, now_s: float) -> StepPlan:
        view = self.workers[worker_id]
        plan = StepPlan(step_id=view.next_step_id, commands=view.pending)
        view.pending = []
        view.next_step_id += 1
        cap = view.capacity
        candidates = list(view.jobs.values()) + self._waiting_for(view, now_s)
        ordered = self._order(candidates, now_s)
        selected = self._select(ordered, cap)
        used = sum(blocks_for(job.num_tokens, cap.block_size) for job in selected)
        # Memory planning concerns this worker's jobs and the jobs ranked ahead of them; the
        # waiting jobs ranked behind all of them change nothing there, so they are cut off.
        cut = len(ordered)
        while cut and ordered[cut - 1].worker_id != worker_id:
            cut -= 1
        plan.commands += self._plan_memory(view, ordered[:cut], selected, used, now_s)
        plan.step_jobs = {job.job_id: job.num_tokens_to_prefill for job in selected}
        plan.commands += self._start(view, selected, now_s)
        plan.run_step = bool(selected)
        return plan

    def _waiting_for(self, view: WorkerView, now_s: float) -> list[Job]:
        """The waiting jobs this worker may take: those it can hold, routed to it.

        Routing (several workers): a waiting job is routed, once, to the worker where it is
        expected to finish first (``_route``); only that worker takes it, unless another
        worker has nothing at all to do, which then takes it rather than idle.
        """
        limit = view.capacity.max_model_len
        if len(self.workers) == 1:
            return [job for job in self.waiting.values() if job.num_tokens < limit]
        routes = self.routes
        wid = view.worker_id
        idle = not view.jobs
        out = []
        for job in self.waiting.values():
            if job.num_tokens >= limit:
                continue
            route = routes.get(job.job_id)
            if route is None or route not in self.workers:
                route = routes[job.job_id] = self._route(job)
            if route == wid or idle:
                out.append(job)
        if len(routes) > 2 * len(self.jobs) + 64:
            for job_id in [k for k in routes if k not in self.waiting]:
                del routes[job_id]
        return out

    def _route(self, job: Job) -> str:
        """The worker where ``job`` is expected to finish first.

        Expected finish on worker w = the job's own remaining time + w's backlog / w's
        parallelism, where the backlog is the estimated remaining time of every job on w or
        routed to it, and the parallelism the number of jobs w runs at once (at least 1).
        Workers that cannot hold the job are skipped; ties go to the lower worker id.
        """
        estimate = getattr(self.policy, "estimator", None) or _DEFAULT_ESTIMATOR
        estimate_of = getattr(self.policy, "estimate_of", None) or _default_estimate
        backlog = dict.fromkeys(self.workers, 0.0)
        for other in self.waiting.values():
            route = self.routes.get(other.job_id)
            if route in backlog and other is not job:
                backlog[route] += estimate.remaining_s(other, estimate_of(other))
        best = None
        own = estimate.remaining_s(job, estimate_of(job))
        for wid in sorted(self.workers):
            view = self.workers[wid]
            if job.num_tokens >= view.capacity.max_model_len:
                continue
            load = backlog[wid] + sum(estimate.remaining_s(j, estimate_of(j))
                                      for j in view.jobs.values())
            running = sum(1 for j in view.jobs.values() if j.status is JobStatus.RUNNING)
            finish = own + load / max(running, 1)
            if best is None or finish < best[0]:
                best = (finish, wid)
        return best[1] if best else sorted(self.workers)[0]

    def _order(self, candidates: list[Job], now_s: float) -> list[Job]:
        """Candidates by (pinned running first for non-preemptive policies, policy key,
        arrival, job id)."""
        policy = self.policy
        keys = policy.keys(candidates, now_s)
        running = JobStatus.RUNNING
        pin = not policy.preemptive
        decorated = sorted(
            (0 if pin and job.status is running else 1, key, job.arrival_s, job.job_id, i)
            for i, (job, key) in enumerate(zip(candidates, keys)))
        return [candidates[d[4]] for d in decorated]

    def _select(self, ordered: list[Job], cap: WorkerCapacity) -> list[Job]:
        selected: list[Job] = []
        used_blocks = 0
        num_tokens = 0
        block_size = cap.block_size
        max_blocks = cap.num_device_blocks
        max_tokens = cap.max_num_batched_tokens
        backfill = self.policy.backfill
        reserve_of = self.policy.reserve_tokens
        reserved = 0.0  # blocks held back for the growth of the jobs selected so far
        running = JobStatus.RUNNING
        for job in ordered:
            if len(selected) == cap.max_num_seqs or used_blocks == max_blocks:
                break  # every job needs a sequence slot and at least one block
            if selected and num_tokens >= max_tokens:
                break  # every job feeds at least one token
            need = -(-(len(job.prompt_token_ids) + len(job.output_token_ids)) // block_size)
            feed = job.num_tokens_to_prefill
            fits_tokens = num_tokens + feed <= max_tokens or not selected
            grow = reserve_of(job) / block_size
            # A job joining the batch must leave room for the growth of those in it.
            limit = max_blocks if job.status is running else max_blocks - reserved - grow
            if used_blocks + need <= limit and fits_tokens:
                selected.append(job)
                used_blocks += need
                num_tokens += feed
                reserved += grow
            elif not backfill:
                break
        return selected

    def _plan_memory(self, view: WorkerView, ordered: list[Job], selected: list[Job],
                     used_blocks: int, now_s: float) -> list[Command]:
        chosen = {job.job_id for job in selected}
        paused = [job for job in ordered
                  if job.worker_id == view.worker_id and job.job_id not in chosen]
        cap = view.capacity
        host_used = sum(held_host_blocks(job, cap.block_size) for job in view.jobs.values())
        waits = expected_waits(ordered, self._remaining_s, {job.job_id for job in paused})
        moves = self.memory.plan(paused, waits, cap, cap.num_device_blocks - used_blocks,
                                 cap.num_host_blocks - host_used)
        # Device-freeing moves first: the worker applies commands in order, and a prefetch
        # (host -> device) may need the blocks that a swap-out or quantization frees.
        moves.sort(key=lambda move: move.job.kv in HOST_PLACES)
        commands: list[Command] = []
        for move in moves:
            commands += self._apply_move(move, now_s)
        return commands

    def _apply_move(self, move: KvMove, now_s: float) -> list[Command]:
        job, actions = move.job, move.actions
        self.kv_moves[_move_label(job.kv, move.target)] += 1
        if job.status is JobStatus.RUNNING:
            actions = actions or (KvAction.KEEP,)
            self.preemptions[actions[0].value] += 1
            job.num_preemptions += 1
            job.status = JobStatus.PAUSED
            job.idle_since_s = now_s
        job.kv = move.target
        return [Pause(job.job_id, action) for action in actions]

    def _start(self, view: WorkerView, selected: list[Job], now_s: float) -> list[Command]:
        commands: list[Command] = []
        for job in selected:
            if job.status is JobStatus.RUNNING:
                continue
            job.queued_s += max(now_s - job.idle_since_s, 0.0)
            if job.status is JobStatus.WAITING:
                self.waiting.pop(job.job_id)
                commands.append(Admit(job.job_id, job.all_token_ids(), job.sampling,
                                      num_generated=job.num_output_tokens))
                job.worker_id = view.worker_id
                view.jobs[job.job_id] = job
            else:
                commands.append(Resume(job.job_id))
            job.status = JobStatus.RUNNING
            job.kv = KvPlace.DEVICE
        return commands

    # ----------------------------------------------------------------- helpers

    def _to_waiting(self, job: Job, now_s: float) -> None:
        job.status = JobStatus.WAITING
        job.kv = KvPlace.NONE
        job.worker_id = None
        job.idle_since_s = now_s
        self.waiting[job.job_id] = job

    def _finish(self, job: Job, reason: FinishReason, now_s: float) -> None:
        if job.status in (JobStatus.WAITING, JobStatus.PAUSED):
            job.queued_s += max(now_s - job.idle_since_s, 0.0)
        job.status = JobStatus.FINISHED
        job.finish_reason = reason
        job.finish_s = now_s
        job.kv = KvPlace.NONE
        self.jobs.pop(job.job_id, None)
        self.num_finished += 1

    def num_with_status(self, status: JobStatus) -> int:
        return sum(1 for job in self.jobs.values() if job.status is status)


def _move_label(source: KvPlace, target: KvPlace) -> str:
    if source in HOST_PLACES and target is not KvPlace.NONE:
        return "prefetch"
    return {KvPlace.DEVICE: "keep", KvPlace.HOST: "swap", KvPlace.HOST_INT8: "swap-int8",
            KvPlace.HOST_INT4: "swap-int4", KvPlace.NONE: "drop"}.get(target, target.value)


_DEFAULT_ESTIMATOR = RemainingTimeEstimator(LatencyModel())


def _default_estimate(job: Job):
    return job.estimate or DEFAULT_ESTIMATE
