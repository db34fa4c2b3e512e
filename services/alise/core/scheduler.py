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

Two implementations of these phases, with the same decisions:

* the reference (``_schedule_reference``): the phases above over Python lists of jobs;
* the fast path (``_schedule_fast``, the default for the built-in policies without the
  starvation rule): every unfinished job lives in numpy columns (``alise.core.candidates``)
  that the core updates whenever it changes a job (submit, admit, pause / KV move, resume,
  finish, cancel, refusal, lost worker). A step then reads only what moves: the output
  lengths of the worker's running jobs; the keys of the ~1,000 waiting jobs are array
  operations over values fixed while they wait (their remaining time is computed once per
  wait), sorted from last step's order. Float results are bit-identical to the reference
  (same operations in the same order; numpy rounds each like Python), ties are broken by the
  same (arrival, job id). ``tests/unit/test_scheduler_fast_path.py`` drives both side by
  side on random job sets; ``bench/sched_decisions.py`` digests every plan of whole
  simulations for before/after comparisons. ``SchedulerCore(..., fast=False)`` forces the
  reference.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from alise.core.blocks import HOST_PLACES, WorkerCapacity, blocks_for, held_host_blocks
from alise.core.candidates import JobColumns, TieLabels
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
from alise.core.memory_planner import (
    DropPlanner, KvMove, MemoryPlanner, expected_waits, make_memory_planner,
)
from alise.core.policy import (
    DEFAULT_ESTIMATE, AlisePolicy, FcfsPolicy, OraclePolicy, Policy, RemainingTimeEstimator,
)

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


#: Policies whose keys the fast path computes itself (exactly as their ``keys`` does).
_FAST_POLICIES = (FcfsPolicy, AlisePolicy, OraclePolicy)


@dataclass
class _Ranked:
    """A worker's candidates in the fast path, as column slots."""

    order: np.ndarray           # slots in the reference order
    keys: np.ndarray | None     # their policy keys, in that order (None: fcfs, key = arrival)
    mine: np.ndarray            # column mask: the worker's jobs (running or paused)
    rslots: np.ndarray          # its running jobs
    islots: np.ndarray          # its idle candidates


class SchedulerCore:
    """See the module doc. ``fast`` (default) plans with ``_schedule_fast`` whenever the policy
    allows it; ``fast=False`` always takes the reference path (``_order``, ``_select``,
    ``_plan_memory`` over Python lists), which the fast one must match decision for decision.
    """

    def __init__(self, policy: Policy, memory: MemoryPlanner | None = None, *,
                 fast: bool = True) -> None:
        self.policy = policy
        estimator = getattr(policy, "estimator", None) or RemainingTimeEstimator(LatencyModel())
        estimate_of = getattr(policy, "estimate_of", lambda job: job.estimate or DEFAULT_ESTIMATE)
        self._estimator = estimator
        self._estimate_of = estimate_of
        self._remaining_s = lambda job: estimator.remaining_s(job, estimate_of(job))
        #: The fast path's incremental state (see ``alise.core.candidates``), kept up to date
        #: by every method below that changes a job, whichever path plans.
        self._fast = fast and type(policy) in _FAST_POLICIES
        self._ties = TieLabels()
        self._cols = JobColumns()
        #: worker index -> its idle candidates in last step's order (a near-sorted start).
        self._idle_order: dict[int, np.ndarray] = {}
        self._worker_index: dict[str, int] = {}
        self._next_worker_index = 0
        self._idle_tie_epoch = 0
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
        # A fresh index per connection (a worker id may come back after it was removed).
        self._worker_index[capacity.worker_id] = self._next_worker_index
        self._next_worker_index += 1
        return view

    def remove_worker(self, worker_id: str, now_s: float) -> list[Job]:
        """Hands a lost worker's jobs back to the waiting queue; they recompute elsewhere."""
        view = self.workers.pop(worker_id, None)
        if view is None:
            return []
        moved = list(view.jobs.values())
        for job in moved:
            self._to_waiting(job, now_s)
        self._idle_order.pop(self._worker_index.pop(worker_id), None)
        return moved

    def submit(self, job: Job) -> None:
        if job.job_id in self.jobs:
            raise ValueError(f"job {job.job_id!r} already exists")
        self.jobs[job.job_id] = job
        self.waiting[job.job_id] = job
        if self._fast:
            self._ties.add(job)
            if self._idle_tie_epoch != self._ties.epoch:
                self._cols.retie(self._ties.label)
                self._idle_tie_epoch = self._ties.epoch
            self._sync(job)

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
            self._sync(job)
        elif command == "pause":
            # The worker paused the job but could not move its KV as told: make the state
            # certain again by dropping whatever it holds before anything else next step.
            job.status = JobStatus.PAUSED
            job.kv = KvPlace.NONE
            view.pending.append(Pause(job_id, KvAction.DROP))
            self._sync(job)

    # ----------------------------------------------------------------- planning

    def schedule(self, worker_id: str, now_s: float) -> StepPlan:
        view = self.workers[worker_id]
        plan = StepPlan(step_id=view.next_step_id, commands=view.pending)
        view.pending = []
        view.next_step_id += 1
        # The starvation rule (max_slowdown) freezes a waiting job's threshold at the latency
        # correction of the step that first saw it (the policy's cache): only the reference
        # path reproduces that timing.
        if self._fast and getattr(self.policy, "max_slowdown", None) is None:
            return self._schedule_fast(view, plan, now_s)
        return self._schedule_reference(view, plan, now_s)

    def _schedule_reference(self, view: WorkerView, plan: StepPlan, now_s: float) -> StepPlan:
        """The four phases over Python lists: the definition the fast path must match."""
        worker_id = view.worker_id
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

    def latency_changed(self) -> None:
        """The latency model's coefficients were replaced (a worker brought its profile):
        every cached remaining time is stale."""
        self.policy.latency_changed()
        self._cols.dirty[:] = True

    # ----------------------------------------------------------------- fast path

    def _sync(self, job: Job) -> None:
        """Brings ``job``'s slot in the fast path's columns in line with its state. Called on
        every change the core makes to a job (jobs are not changed behind its back)."""
        if not self._fast:
            return
        cols = self._cols
        job_id = job.job_id
        status = job.status
        view = self.workers.get(job.worker_id) if job.worker_id is not None else None
        if self.waiting.get(job_id) is job:
            if (status is not JobStatus.WAITING and status is not JobStatus.PAUSED) \
                    or job.worker_id is not None:
                self._fast = False  # a queued job that looks placed: only the reference copes
                return
            owner = -1
        elif view is not None and view.jobs.get(job_id) is job and (
                status is JobStatus.PAUSED or status is JobStatus.RUNNING):
            owner = self._worker_index[job.worker_id]
        else:
            cols.discard(job_id)
            return
        tie = self._ties.label.get(job_id)
        if tie is None:
            self._fast = False  # never submitted here: no tie label
            return
        host = held_host_blocks(job, view.capacity.block_size) if view is not None else 0
        running = status is JobStatus.RUNNING
        cols.put(job, owner, tie, host, self._estimate_of(job) if running else None, running)

    def _fill_remaining(self, slots: np.ndarray) -> None:
        """Remaining time before correction (and, for a reserving policy, the growth reserve)
        of the idle jobs in ``slots`` not yet known."""
        cols = self._cols
        todo = slots[cols.dirty[slots]]
        if not len(todo):
            return
        remaining = self._estimator.remaining_base_s
        estimate_of = self._estimate_of
        jobs, rb = cols.jobs, cols.rb
        reserve_of = self.policy.reserve_tokens if self._reserving else None
        for slot in todo.tolist():
            job = jobs[slot]
            rb[slot] = remaining(job, estimate_of(job))
            if reserve_of is not None:
                cols.reserve[slot] = reserve_of(job)
        cols.dirty[todo] = False

    @property
    def _reserving(self) -> bool:
        """Whether the policy holds back room for the selected jobs' growth."""
        return bool(getattr(self.policy, "reserve_horizon_tokens", 0))

    def _schedule_fast(self, view: WorkerView, plan: StepPlan, now_s: float) -> StepPlan:
        """``schedule`` for the built-in policies, decision for decision the same.

        The reference sorts a Python list of every candidate by key tuples; here candidates
        are slots of ``JobColumns``: the idle ones' keys are a few array operations over
        values that cannot change while they wait, the running ones' a few more over their
        output lengths (read each step). Keys are computed with the same floating-point
        operations in the same order (numpy's elementwise ops and ``cumsum`` round exactly
        like Python's), ties are broken by the same (arrival, job id) through ``TieLabels``,
        and selection and memory planning read the same values. Same phases as the
        reference: ``_fast_order``, selection (``_select_runs``), ``_fast_waits`` for the
        memory planner, ``_start``.
        """
        ranked = self._fast_order(view, now_s)
        if ranked is None:
            return self._schedule_reference(view, plan, now_s)
        cols = self._cols
        cap = view.capacity
        order = ranked.order

        # Selection: the reference's walk (``_select``), over the ordered block and token needs.
        ntok = cols.ntok[order]
        need = -(-ntok // cap.block_size)
        feed = np.where(cols.kv_none[order], ntok, 1)
        grow = cols.reserve[order] / cap.block_size if self._reserving else None
        taken = _select_runs(need, feed, cap, self.policy.backfill, grow, cols.running[order])
        chosen = order[taken]
        selected = cols.jobs[chosen].tolist()
        starting = cols.jobs[chosen[~cols.running[chosen]]].tolist()
        used_blocks = int(need[taken].sum())
        step_jobs = dict(zip(cols.ids[chosen].tolist(), feed[taken].tolist()))

        # Memory: this worker's jobs that were not selected, best-ranked first.
        left = ranked.mine[order]
        left[taken] = False
        positions = np.flatnonzero(left)
        paused = cols.jobs[order[positions]].tolist()
        waits: dict[str, float] = {}
        if paused and type(self.memory) is not DropPlanner:  # the drop planner ignores waits
            waits = self._fast_waits(ranked, positions)
        host_used = int(cols.host_blocks[ranked.mine].sum())
        moves = self.memory.plan(paused, waits, cap, cap.num_device_blocks - used_blocks,
                                 cap.num_host_blocks - host_used)
        moves.sort(key=lambda move: move.job.kv in HOST_PLACES)
        commands = plan.commands
        for move in moves:
            commands += self._apply_move(move, now_s)
        plan.step_jobs = step_jobs
        commands += self._start(view, starting, now_s)
        plan.run_step = bool(selected)
        return plan

    def _fast_order(self, view: WorkerView, now_s: float) -> _Ranked | None:
        """The candidates of ``view``'s next step in the reference ``_order``'s order, as
        column slots (None when the columns disagree with the worker's jobs)."""
        policy = self.policy
        cap = view.capacity
        wid = view.worker_id
        widx = self._worker_index[wid]
        cols = self._cols

        # Candidates: this worker's running jobs, the waiting jobs it may take, its paused jobs.
        owner = cols.owner
        mine = owner == widx
        if int(np.count_nonzero(mine)) != len(view.jobs):
            # A job changed behind the core's back: the reference path reads jobs directly.
            logger.error("worker %s: the fast path lost track of its jobs; planning with the "
                         "reference path from now on", wid)
            self._fast = False
            return None
        is_running = cols.running
        rslots = np.flatnonzero(mine & is_running)
        if len(self.workers) == 1:
            mask = ((owner == -1) & (cols.ntok < cap.max_model_len)) | (mine & ~is_running)
        else:
            mask = mine & ~is_running
            slot_of = cols.slot_of
            for job in self._waiting_for(view, now_s):
                mask[slot_of[job.job_id]] = True
        # The idle candidates, last step's order first (a slot reused since is harmless: the
        # order is only where the sort starts), then the new ones.
        last = self._idle_order.get(widx)
        if last is not None and len(last):
            last = last[mask[last]]
            mask[last] = False
            islots = np.concatenate((last, np.flatnonzero(mask)))
        else:
            islots = np.flatnonzero(mask)
        run_jobs = cols.jobs[rslots].tolist()
        done = np.array([len(job.output_token_ids) for job in run_jobs], dtype=np.int64)
        cols.ntok[rslots] = cols.plen[rslots] + done

        # Order: the reference's (pinned running first, key, arrival, job id).
        ties = cols.tie
        if type(policy) is FcfsPolicy:
            # Key = arrival: running first, then by arrival and job id, i.e. the tie labels.
            idle_order = islots[np.argsort(ties[islots], kind="stable")]
            order = np.concatenate((rslots[np.argsort(ties[rslots])], idle_order))
            keys = None
        else:
            self._fill_remaining(islots)
            run_rb, run_keys, run_tokens = self._running_keys(rslots, done)
            cols.rb[rslots] = run_rb
            if self._reserving:  # AlisePolicy.reserve_tokens, elementwise
                cols.reserve[rslots] = np.minimum(policy.reserve_fraction * run_tokens,
                                                  policy.reserve_horizon_tokens)
            corr = policy.estimator.latency.correction
            aging = policy.aging_rate
            idle_keys = cols.rb[islots] * corr - aging * (
                cols.queued[islots] + np.maximum(now_s - cols.idle_since[islots], 0.0))
            slots = np.concatenate((islots, rslots))
            keys = np.concatenate((idle_keys, run_keys))
            if policy.preemptive:
                perm = _sort_by_key(keys, ties[slots])
                order = slots[perm]
                idle_order = order[~is_running[order]]
            else:
                idle_perm = _sort_by_key(idle_keys, ties[islots])
                idle_order = islots[idle_perm]
                perm = np.concatenate((
                    _sort_by_key(run_keys, ties[rslots]) + len(islots), idle_perm))
                order = slots[perm]
            keys = keys[perm]
        self._idle_order[widx] = idle_order
        return _Ranked(order, keys, mine, rslots, islots)

    def _fast_waits(self, ranked: _Ranked, positions: np.ndarray) -> dict[str, float]:
        """``expected_waits`` of the jobs at ``positions`` of ``ranked.order``: the remaining
        time of every job ahead, summed front to back like the reference's loop."""
        cols = self._cols
        if type(self.policy) is FcfsPolicy:  # keys needed no remaining times; waits do
            self._fill_remaining(ranked.islots)
            cols.rb[ranked.rslots] = [self._estimator.remaining_base_s(job, self._estimate_of(job))
                                      for job in cols.jobs[ranked.rslots].tolist()]
        order = ranked.order
        last = int(positions[-1])
        ahead = [0.0] + np.cumsum(cols.rb[order[:last]] * self._estimator.latency.correction
                                  ).tolist()
        return dict(zip(cols.ids[order[positions]].tolist(), [ahead[p] for p in positions.tolist()]))

    def _running_keys(self, rslots: np.ndarray,
                      done: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(remaining time before correction, key, remaining tokens) of running jobs:
        ``AlisePolicy.keys`` without the starvation rule, ``RemainingTimeEstimator.remaining_base_s``
        inlined, elementwise, operation for operation (ints convert to floats exactly, as in
        Python)."""
        policy = self.policy
        cols = self._cols
        est = policy.estimator
        lat = est.latency
        mean = cols.mean[rslots]
        p90 = cols.p90[rslots]
        fdone = done.astype(np.float64)
        ntok = cols.ntok[rslots].astype(np.float64)
        remaining = np.where(fdone < mean, mean - fdone,
                             np.where(fdone < p90, p90 - fdone, fdone * (est.overrun_growth - 1.0)))
        limit = (cols.max_tokens[rslots] - done).astype(np.float64)
        tokens = np.maximum(np.minimum(remaining, limit), 1.0)
        per_token = lat.c0_s / est.typical_batch + lat.c_seq_s + lat.c_ctx_s * (ntok + tokens / 2)
        rb = tokens * per_token
        kv_none = cols.kv_none[rslots]
        if kv_none.any():
            prefill = np.where(kv_none, lat.c0_s + lat.c_seq_s + lat.c_mixed_s + lat.c_chunk_s
                               + (lat.c_ctx_s + lat.c_pre_s) * ntok + lat.c_pre2_s * ntok * ntok, 0.0)
            rb = prefill + rb
        keys = (rb * lat.correction * (1.0 - policy.hysteresis) - policy.switch_cost_s) \
            - policy.aging_rate * cols.queued[rslots]
        return rb, keys, tokens

    def _select_walk(self, jobs: Iterable[Job], needs: Iterable[int], feeds: Iterable[int],
                     running: Iterable[bool], cap: WorkerCapacity) -> list[int]:
        """Greedy selection over the ordered candidates (blocks each needs, tokens each feeds,
        whether it runs): sequence, token and block budgets, growth reserves of the policy,
        backfill past a job that does not fit when the policy allows it. Returns the
        positions taken; iterables are consumed only as far as the walk goes."""
        taken: list[int] = []
        used_blocks = 0
        num_tokens = 0
        max_blocks = cap.num_device_blocks
        max_tokens = cap.max_num_batched_tokens
        backfill = self.policy.backfill
        reserve_of = self.policy.reserve_tokens
        reserved = 0.0
        for i, (job, need, feed, is_running) in enumerate(zip(jobs, needs, feeds, running)):
            if len(taken) == cap.max_num_seqs or used_blocks == max_blocks:
                break
            if taken and num_tokens >= max_tokens:
                break
            fits_tokens = num_tokens + feed <= max_tokens or not taken
            grow = reserve_of(job) / cap.block_size
            limit = max_blocks if is_running else max_blocks - reserved - grow
            if used_blocks + need <= limit and fits_tokens:
                taken.append(i)
                used_blocks += need
                num_tokens += feed
                reserved += grow
            elif not backfill:
                break
        return taken

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
        """The reference selection: ``_select_walk`` over lazily computed needs (it stops early)."""
        block_size = cap.block_size
        running = JobStatus.RUNNING
        needs = (-(-(len(job.prompt_token_ids) + len(job.output_token_ids)) // block_size)
                 for job in ordered)
        feeds = (job.num_tokens_to_prefill for job in ordered)
        is_running = (job.status is running for job in ordered)
        return [ordered[i] for i in self._select_walk(ordered, needs, feeds, is_running, cap)]

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
        self._sync(job)
        return [Pause(job.job_id, action) for action in actions]

    def _start(self, view: WorkerView, selected: list[Job], now_s: float) -> list[Command]:
        commands: list[Command] = []
        for job in selected:
            if job.status is JobStatus.RUNNING:
                continue
            job.queued_s += max(now_s - job.idle_since_s, 0.0)
            if job.status is JobStatus.WAITING:
                self.waiting.pop(job.job_id)
                commands.append(Admit(job.job_id, job.all_token_ids(), job.worker_sampling,
                                      num_generated=job.num_output_tokens))
                job.worker_id = view.worker_id
                view.jobs[job.job_id] = job
            else:
                commands.append(Resume(job.job_id))
            job.status = JobStatus.RUNNING
            job.kv = KvPlace.DEVICE
            self._sync(job)
        return commands

    # ----------------------------------------------------------------- helpers

    def _to_waiting(self, job: Job, now_s: float) -> None:
        job.status = JobStatus.WAITING
        job.kv = KvPlace.NONE
        job.worker_id = None
        job.idle_since_s = now_s
        self.waiting[job.job_id] = job
        self._sync(job)

    def _finish(self, job: Job, reason: FinishReason, now_s: float) -> None:
        if job.status in (JobStatus.WAITING, JobStatus.PAUSED):
            job.queued_s += max(now_s - job.idle_since_s, 0.0)
        job.status = JobStatus.FINISHED
        job.finish_reason = reason
        job.finish_s = now_s
        job.kv = KvPlace.NONE
        self.jobs.pop(job.job_id, None)
        self.num_finished += 1
        if self._fast:
            self._cols.discard(job.job_id)
            self._ties.remove(job)

    def num_with_status(self, status: JobStatus) -> int:
        return sum(1 for job in self.jobs.values() if job.status is status)


def _sort_by_key(keys: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """The permutation that sorts by (key, tie label). A stable sort is fast on an almost
    sorted start; the runs of equal keys it leaves (rare but possible) are then ordered by
    label."""
    perm = np.argsort(keys, kind="stable")
    ordered = keys[perm]
    if len(ordered) > 1:
        equal = ordered[1:] == ordered[:-1]
        if equal.any():
            tied = np.zeros(len(ordered), dtype=bool)
            tied[1:] = equal
            tied[:-1] |= equal
            at = np.flatnonzero(tied)  # runs of equal keys, in key order
            sub = perm[at]
            perm[at] = sub[np.lexsort((ties[sub], ordered[at]))]
    return perm


def _select_runs(need: np.ndarray, feed: np.ndarray, cap: WorkerCapacity, backfill: bool,
                 grow: np.ndarray | None = None, running: np.ndarray | None = None) -> np.ndarray:
    """``SchedulerCore._select_walk`` over the ordered candidates' block needs and fed tokens
    (ints) and, for a reserving policy, their growth reserves in blocks (``grow``, floats)
    and whether each runs; returns the positions taken.

    The walk takes every candidate that fits and, unless backfilling, stops at the first that
    does not. Here a run of candidates that all fit is taken at once (running sums), and with
    backfill the candidates that cannot fit what is left are skipped at once; the budgets only
    shrink as jobs are taken, so the positions are exactly the walk's. With reserves, a
    candidate that is not running must fit under ``(max_blocks - reserved) - its grow``, where
    ``reserved`` sums the grows of those taken before it: the same float operations in the same
    order as the walk (``np.cumsum`` accumulates left to right, like ``+=``).
    """
    max_blocks = cap.num_device_blocks
    max_tokens = cap.max_num_batched_tokens
    max_seqs = cap.max_num_seqs
    n = len(need)
    taken: list[np.ndarray] = []
    num_taken = 0
    used = 0
    tokens = 0
    reserved = 0.0
    i = 0
    while i < n:
        if num_taken == max_seqs or used == max_blocks:
            break
        if num_taken and tokens >= max_tokens:
            break
        # Take the longest run from i in which every candidate fits (within the seq budget).
        end = min(n, i + max_seqs - num_taken)
        blocks = used + np.cumsum(need[i:end])
        fed = tokens + np.cumsum(feed[i:end])
        if grow is None:
            fits_blocks = blocks <= max_blocks
        else:
            before = np.cumsum(np.concatenate(([reserved], grow[i:end])))  # reserved before each, then after all
            limit = np.where(running[i:end], max_blocks, (max_blocks - before[:-1]) - grow[i:end])
            fits_blocks = blocks <= limit
        fits = fits_blocks & (fed <= max_tokens)
        if not num_taken:
            fits[0] = fits_blocks[0]  # the first job may feed more than the budget
        k = int(np.argmin(fits)) if not fits.all() else end - i
        if k:
            taken.append(np.arange(i, i + k))
            num_taken += k
            used = int(blocks[k - 1])
            tokens = int(fed[k - 1])
            if grow is not None:
                reserved = float(before[k])
            i += k
            continue
        # Candidate i does not fit (a break above never hides behind a misfit: every job
        # needs a block and feeds a token, so a full budget makes the next one misfit).
        if not backfill:
            break
        if grow is None:
            rest = (need[i + 1:] <= max_blocks - used)
        else:
            rest = used + need[i + 1:] <= np.where(running[i + 1:], max_blocks,
                                                   (max_blocks - reserved) - grow[i + 1:])
        if num_taken:
            rest &= feed[i + 1:] <= max_tokens - tokens
        nxt = np.flatnonzero(rest)
        if not len(nxt):
            break
        i += 1 + int(nxt[0])
    return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)


def _move_label(source: KvPlace, target: KvPlace) -> str:
    if source in HOST_PLACES and target is not KvPlace.NONE:
        return "prefetch"
    return {KvPlace.DEVICE: "keep", KvPlace.HOST: "swap", KvPlace.HOST_INT8: "swap-int8",
            KvPlace.HOST_INT4: "swap-int4", KvPlace.NONE: "drop"}.get(target, target.value)


_DEFAULT_ESTIMATOR = RemainingTimeEstimator(LatencyModel())


def _default_estimate(job: Job):
    return job.estimate or DEFAULT_ESTIMATE
