"""The scheduler core: which jobs run on which worker, step by step.

Pure Python and numpy: no gRPC, no torch. The scheduler service, the tests and the simulator
all drive this same class. The parts, each with one job:

* :class:`~alise.core.table.JobTable`   every unfinished job as numpy columns (the queue);
* the policy (``alise.core.policy``)     keys the candidates (ranking);
* :func:`~alise.core.admission.select`   who runs within the step's budgets (admission);
* :class:`~alise.core.routing.Router`    which worker a waiting job goes to;
* the memory planner                     where each paused job's KV goes;
* :mod:`~alise.core.reports`             report checking and the plans in flight.

Planning runs ahead of the workers: ``schedule`` plans a worker's next step on top of every
step already planned for it, before their reports are in (a job's projected tokens, see
``alise.core.job``). The engine keeps a few plans in flight per worker, so a worker
always has its next plan when a step ends. ``schedule`` runs in named phases:

1. ``_candidates``   the worker's running and paused jobs, and the waiting jobs it may take;
2. ``_rank``         the policy's keys; non-preemptive policies keep running jobs first;
3. ``_select``       the walk within the sequence, block and token budgets (chunked prefill);
4. ``_plan_memory``  a KV place for each of the worker's jobs that does not run;
5. ``_start``        admit or resume the selected jobs that are not running;
6. ``_advance``      project the step: computed tokens and pending outputs of each job fed.

Block accounting is exact (the worker allocates by the same formulas), so a plan never asks
a worker for more blocks than it has; jobs that finish early only leave it more. A worker with
prefix caching has a mirror of its cache here (``alise.core.prefix_mirror``): a waiting job's
cached prefix is not fed, its shared blocks are counted once, and the mirror follows every
admit, step, KV move and release of the plans in the order the worker applies them.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from alise.core.admission import Budgets, select
from alise.core.blocks import WorkerCapacity, blocks_for, held_device_blocks, held_host_blocks
from alise.core.census import CensusFindings, Disagreements, check_census
from alise.core.commands import Admit, Command, HeldJob, KvAction, Pause, Resume, StepPlan, StepReport, TokenEvent
from alise.core.config import SchedulingConfig
from alise.core.job import FinishReason, Job, JobStatus, KvPlace, LengthEstimate
from alise.core.kv_places import PLACES, move_label
from alise.core.latency_model import LatencyModel
from alise.core.memory_planner import KvMove, MemoryPlanner, make_memory_planner
from alise.core.policy import Policy, RemainingTimeEstimator
from alise.core.prefix_mirror import HashMemo, PrefillCounts, PrefixMirror
from alise.core.reports import InFlight, check_report, job_at, strike
from alise.core.routing import Router
from alise.core.table import WAITING, JobTable

logger = logging.getLogger(__name__)

#: The smallest prompt chunk a step's latency allowance is rounded up to.
MIN_CHUNK_TOKENS = 16
#: Statuses of a job that a worker holds (it is in that ``WorkerView.jobs``).
_ON_WORKER = frozenset({JobStatus.RUNNING, JobStatus.PAUSED})


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


class SchedulerCore:
    def __init__(self, policy: Policy, memory: MemoryPlanner | None = None, *,
                 latency: LatencyModel | None = None,
                 prefill_step_ratio: float = SchedulingConfig.prefill_step_ratio) -> None:
        self.policy = policy
        #: A step that carries prompt chunks beside decodes may cost at most this many times the
        #: decode step alone (by a measured latency model; not capped under the default one).
        self.prefill_step_ratio = prefill_step_ratio
        latency = latency or policy.latency or LatencyModel()
        self.estimator = RemainingTimeEstimator(latency, overrun_growth=policy.overrun_growth)
        # fcfs is vLLM's behaviour: recompute preemption. The speculative policies plan KV moves.
        self.memory = memory or make_memory_planner("drop" if not policy.preemptive else "adaptive", latency)
        self.table = JobTable(self.estimator)
        self.router = Router(self.table)
        self.jobs: dict[str, Job] = {}
        self.waiting: dict[str, Job] = {}
        self.workers: dict[str, WorkerView] = {}
        self._next_index = 0
        self.num_finished = 0
        self.num_cancelled = 0
        self.preemptions: Counter[str] = Counter()
        #: KV moves by kind (keep, int8, int4, swap, swap-int8, swap-int4, drop, prefetch).
        self.kv_moves: Counter[str] = Counter()
        self.hash_memo = HashMemo()
        #: Tokens admitted, found in a prefix cache, and computed by prefills (recomputes too).
        self.prefill = PrefillCounts()

    @property
    def latency(self) -> LatencyModel:
        return self.estimator.latency

    # ----------------------------------------------------------------- membership

    def add_worker(self, capacity: WorkerCapacity) -> WorkerView:
        if capacity.worker_id in self.workers:
            raise ValueError(f"worker {capacity.worker_id!r} is already connected")
        view = WorkerView(capacity, self._next_index)
        if capacity.prefix_caching:
            view.prefix = PrefixMirror(capacity.num_device_blocks, capacity.block_size, self.hash_memo)
        self._next_index += 1  # a fresh index per connection: a worker id may come back
        self.workers[capacity.worker_id] = view
        self.router.add_worker(view.index, capacity.worker_id, capacity.max_model_len)
        return view

    def remove_worker(self, worker_id: str, now_s: float) -> list[Job]:
        """Hands a lost worker's jobs back to the waiting queue; they recompute elsewhere."""
        view = self.workers.pop(worker_id, None)
        if view is None:
            return []
        self.router.remove_worker(view.index)
        moved = list(view.jobs.values())
        for job in moved:
            self._to_waiting(job, now_s)
        return moved

    def adopt(self, worker_id: str, held: list[HeldJob], now_s: float, *, own: bool = False) -> list[Job]:
        """Takes on the jobs a worker kept while it had no scheduler, paused on that worker with
        the KV it kept, and returns them. Those this core already knows are aborted on the
        worker instead: their jobs live on here (re-queued when the worker was lost). ``own``:
        this core handed the jobs out itself (the worker lost its stream to this scheduler,
        not to one before it): each has since been re-queued, finished or cancelled here, so
        all are aborted; adopting one would run it twice."""
        view = self.workers[worker_id]
        adopted = []
        for h in held:
            if own or h.job_id in self.jobs:
                view.aborts.append(h.job_id)
                continue
            num_prompt = len(h.token_ids) - h.num_generated
            # Built paused (not moved there): it has been on the worker all along.
            job = Job(h.job_id, list(h.token_ids[:num_prompt]), h.sampling, arrival_s=now_s,
                      output_token_ids=list(h.token_ids[num_prompt:]), num_computed_tokens=h.num_computed,
                      status=JobStatus.PAUSED, kv=KvPlace.DEVICE if h.num_computed else KvPlace.NONE,
                      worker_id=worker_id)
            self.jobs[job.job_id] = job
            view.jobs[job.job_id] = job
            if view.prefix is not None:
                view.prefix.adopt(job, blocks_for(h.num_computed, view.capacity.block_size))
            self._put(job)
            adopted.append(job)
        return adopted

    def submit(self, job: Job) -> None:
        if job.job_id in self.jobs:
            raise ValueError(f"job {job.job_id!r} already exists")
        self.jobs[job.job_id] = job
        self.waiting[job.job_id] = job
        self._put(job)

    def cancel(self, job_id: str, now_s: float) -> bool:
        """Aborts a job wherever it is; its worker frees it at its next step boundary."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        view = self.workers.get(job.worker_id) if job.worker_id is not None else None
        if view is not None:
            view.aborts.append(job_id)
            strike(view.in_flight, job_id)
        self._finish(job, FinishReason.ABORTED, now_s)
        return True

    def update_estimate(self, job_id: str, estimate: LengthEstimate) -> None:
        """A prediction arrived for a job queued with a prior one: it is re-keyed."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.estimate = estimate
            self._put(job)

    def take_aborts(self, worker_id: str) -> tuple[list[str], int]:
        """(jobs the worker must abort at its next step boundary, the last plan sent before
        them): sent at once, ahead of the plans the worker holds, on the stream that carries
        the plans (the worker skips an admit of one of them in a plan up to that one)."""
        view = self.workers.get(worker_id)
        if view is None or not view.aborts:
            return [], 0
        aborts, view.aborts = view.aborts, []
        through = view.next_step_id - 1
        for job_id in aborts:
            view.aborting[job_id] = through
        return aborts, through

    def num_in_flight(self, worker_id: str) -> int:
        return len(self.workers[worker_id].in_flight)

    def latency_changed(self) -> None:
        """The latency model's coefficients were replaced: every cached remaining time is stale."""
        self.policy.latency_changed()
        self.table.mark_stale()

    # ----------------------------------------------------------------- reports

    def apply_report(self, worker_id: str, report: StepReport, now_s: float) -> list[TokenEvent]:
        """Applies a report, checked whole first (:func:`alise.core.reports.check_report`
        raises ``ReportError`` and nothing changes)."""
        view = self.workers[worker_id]
        check_report(report, view.in_flight, view.jobs)
        expected = view.in_flight.popleft()
        for refusal in report.refused:
            job = job_at(view.jobs, refusal.job_id, report.step_id)
            if job is not None:
                logger.warning("worker %s refused %s of %s: %s; it recomputes", worker_id,
                               refusal.command, job.job_id, refusal.reason)
                self._requeue(view, job, now_s)
                if view.prefix is not None:
                    # What the worker lacked or never computed is not counted on again.
                    view.prefix.forget(job)
        events = []
        for out in report.outputs:
            job = job_at(view.jobs, out.job_id, report.step_id)
            if job is None:
                continue
            index = job.num_output_tokens
            job.output_token_ids.extend(out.token_ids)
            job.num_pending_outputs -= 1
            if job.first_token_s is None:
                job.first_token_s = now_s
            events.append(TokenEvent(job.job_id, list(out.token_ids), index, out.finish_reason))
            if out.finish_reason is not None:
                strike(view.in_flight, job.job_id)
                self._finish(job, out.finish_reason, now_s)
        if expected.census:
            self._reconcile(view, report, expected.planned_free_blocks, now_s)
        if view.aborting:  # an abort sent after this plan or an earlier one has taken effect
            view.aborting = {j: t for j, t in view.aborting.items() if t > report.step_id}
        return events

    def _reconcile(self, view: WorkerView, report: StepReport, planned_free_blocks: int,
                   now_s: float) -> CensusFindings:
        """Checks the worker's census (``alise.core.census``): ghosts are aborted, missing
        jobs go back to the queue."""
        findings = check_census(report.step_id, report.census_job_ids, view.jobs, view.aborting, view.aborts,
                                planned_free_blocks=planned_free_blocks,
                                reported_free_blocks=report.num_free_device_blocks)
        view.disagreements.add(findings)
        if findings.agrees:
            return findings
        logger.error("worker %s disagrees after step %d: %d jobs it holds are unknown here (aborted), "
                     "%d jobs counted here it does not hold (recomputed), %d device blocks in use "
                     "beyond the plan: %s", view.worker_id, report.step_id, len(findings.ghosts),
                     len(findings.missing), findings.block_deficit,
                     ", ".join([*findings.ghosts[:5], *(job.job_id for job in findings.missing[:5])]))
        view.aborts.extend(findings.ghosts)
        for job in findings.missing:
            self._requeue(view, job, now_s)
        return findings

    def _requeue(self, view: WorkerView, job: Job, now_s: float) -> None:
        """A refused command: the worker drops whatever it holds of the job, which goes back
        to the queue with its confirmed tokens (a rare path; correct before cheap)."""
        view.aborts.append(job.job_id)
        strike(view.in_flight, job.job_id)
        self._to_waiting(job, now_s)

    # ----------------------------------------------------------------- planning

    def schedule(self, worker_id: str, now_s: float, *, census: bool = False) -> StepPlan:
        """Plans the worker's next step on top of the steps in flight (an empty plan, when
        there is nothing to do, is not in flight and need not be sent). ``census``: the
        report is to list the worker's jobs (a plan with nothing else to do still goes).
        Aborts never ride in a plan: they wait for ``take_aborts``."""
        view = self.workers[worker_id]
        plan = StepPlan(step_id=view.next_step_id, census=census)
        slots, held = self._candidates(view)
        order, reserve = self._rank(slots, now_s)
        need, hits = self._needs(view, order)
        taken, feed = self._select(view, order, need, reserve, held + view.num_shared_blocks, hits)
        used = int(need[taken].sum()) + held + view.num_shared_blocks
        plan.commands += self._plan_memory(view, order, taken, used, now_s)
        chosen = order[taken]
        plan.commands += self._start(view, chosen, hits[taken], now_s)
        plan.chunks, outputs = self._advance(view, chosen, feed)
        plan.run_step = bool(len(feed)) and bool(feed.any())
        if not plan.is_empty:
            view.next_step_id += 1
            view.in_flight.append(InFlight(plan.step_id, outputs, census=census, planned_free_blocks=(
                view.num_free_device_blocks if census else 0)))
        return plan

    def _candidates(self, view: WorkerView) -> tuple[np.ndarray, int]:
        """(slots of the step's candidates, device blocks held by running jobs whose last
        token is in flight: they end with it, so they are not candidates)."""
        table, cap = self.table, view.capacity
        owner = table.owner
        mine = owner == view.index
        rslots = np.flatnonzero(mine & table.is_running)
        gen = table.num_tokens[rslots] - table.num_prompt_tokens[rslots]
        done = (gen >= table.max_tokens[rslots]) | (table.num_tokens[rslots] >= cap.max_model_len)
        held = 0
        if done.any():
            finishing = rslots[done]
            mine[finishing] = False
            private = table.num_computed_tokens[finishing] - table.num_shared_tokens[finishing]
            held = int((-(-private // cap.block_size)).sum())
        waiting = (owner == WAITING) & (table.num_tokens < cap.max_model_len)
        if len(self.workers) > 1:
            self.router.route_new(np.flatnonzero(owner == WAITING), self.latency.correction, self._prefix_saving_s)
            if view.jobs:  # an idle worker takes jobs routed elsewhere rather than idle
                waiting &= table.route == view.index
        return np.flatnonzero(mine | waiting), held

    def _rank(self, slots: np.ndarray, now_s: float) -> tuple[np.ndarray, np.ndarray | None]:
        """(``slots`` in the policy's order, their growth reserves in tokens or None). Order:
        key, then arrival and job id (tie labels); running jobs first for a non-preemptive
        policy."""
        if not len(slots):
            return slots, None
        policy, table = self.policy, self.table
        cands = table.candidates(slots)
        keys = policy.keys(cands, now_s)
        ties = table.tie_label[slots]
        if policy.preemptive:
            perm = np.lexsort((ties, keys))
        else:
            perm = np.lexsort((ties, keys, ~cands.running))
        reserve = policy.reserve_tokens(cands)
        return slots[perm], None if reserve is None else reserve[perm]

    def _needs(self, view: WorkerView, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(device blocks each candidate needs to run, tokens of each waiting one's prefix
        cached on the worker). Shared blocks count once, in ``view.num_shared_blocks``; a
        waiting job's hit on cached blocks no job reads takes those out of the free ones."""
        table, bs = self.table, view.capacity.block_size
        private = table.num_tokens[order] - table.num_shared_tokens[order]
        hits = np.zeros(len(order), dtype=np.int64)
        if view.prefix is None:
            return -(-private // bs), hits
        taken_free = np.zeros(len(order), dtype=np.int64)
        # A step takes at most max_num_seqs jobs, so the lookups stop at that many waiting ones
        # (bounded work per plan); one ranked below them that backfill takes starts uncached.
        for i in np.flatnonzero(table.owner[order] == WAITING)[:view.capacity.max_num_seqs].tolist():
            hits[i], taken_free[i] = view.prefix.lookup(table.jobs[order[i]])
        return -(-(private - hits) // bs) + taken_free, hits

    def _prefix_saving_s(self, slot: int, index: int) -> float:
        """Seconds of prefill a waiting job saves on the worker of ``index`` (its cached prefix)."""
        view = next((v for v in self.workers.values() if v.index == index), None)
        if view is None or view.prefix is None:
            return 0.0
        hit, _ = view.prefix.lookup(self.table.jobs[slot])
        n, lat = int(self.table.num_tokens[slot]), self.latency
        return float(lat.recompute_base_s(n) - lat.recompute_base_s(n, hit)) * lat.correction if hit else 0.0

    def _select(self, view: WorkerView, order: np.ndarray, need: np.ndarray, reserve: np.ndarray | None,
                held: int, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cap, table = view.capacity, self.table
        grow = None if reserve is None else reserve / cap.block_size
        uncomputed, running = table.uncomputed(order) - hits, table.is_running[order]
        budgets = Budgets(cap.max_num_seqs, cap.num_device_blocks - held, cap.max_num_batched_tokens,
                          self._prefill_allowance(order, running & (uncomputed == 1)))
        return select(need, uncomputed, running, budgets, self.policy.backfill, grow)

    def _prefill_allowance(self, order: np.ndarray, decoding: np.ndarray) -> int | None:
        """Prompt tokens the step may add beside its decodes (``LatencyModel.chunk_allowance``),
        at least ``MIN_CHUNK_TOKENS`` so prompts always progress; None where unpriced."""
        latency = self.latency
        if not latency.measured or not self.prefill_step_ratio:
            return None
        context = int(self.table.num_tokens[order][decoding].sum())
        allowance = latency.chunk_allowance(int(np.count_nonzero(decoding)), context, self.prefill_step_ratio)
        return None if allowance is None else max(allowance, MIN_CHUNK_TOKENS)

    def _plan_memory(self, view: WorkerView, order: np.ndarray, taken: np.ndarray, used: int,
                     now_s: float) -> list[Command]:
        """KV places for the worker's jobs that do not run (best-ranked first)."""
        table, cap = self.table, view.capacity
        left = table.owner[order] == view.index
        left[taken] = False
        positions = np.flatnonzero(left)
        if not len(positions):
            return []
        paused = table.jobs[order[positions]].tolist()
        waits: dict[str, float] = {}
        if self.memory.uses_waits:  # the wait of a job: the remaining time of every job ahead
            remaining_s = table.remaining_base_s[order] * self.latency.correction
            ahead = np.concatenate(([0.0], np.cumsum(remaining_s)))
            waits = dict(zip([job.job_id for job in paused], ahead[positions].tolist(), strict=True))
        host_used = int(table.num_host_blocks[table.owner == view.index].sum())
        moves = self.memory.plan(paused, waits, cap, cap.num_device_blocks - used,
                                 cap.num_host_blocks - host_used)
        # Device-freeing moves first: the worker applies commands in order, and a prefetch
        # (host -> device) may need the blocks that a swap-out or quantization frees.
        moves.sort(key=lambda move: PLACES[move.job.kv].on_host)
        commands: list[Command] = []
        for move in moves:
            commands += self._apply_move(move, now_s)
        return commands

    def _apply_move(self, move: KvMove, now_s: float) -> list[Command]:
        job, actions = move.job, move.actions
        self.kv_moves[move_label(job.kv, move.target)] += 1
        if job.status is JobStatus.RUNNING:
            actions = actions or (KvAction.KEEP,)
            self.preemptions[actions[0].value] += 1
        self._set_status(job, JobStatus.PAUSED, now_s, kv=move.target)
        return [Pause(job.job_id, action) for action in actions]

    def _start(self, view: WorkerView, chosen: np.ndarray, hits: np.ndarray, now_s: float) -> list[Command]:
        table, counts = self.table, self.prefill
        starts = ~table.is_running[chosen]
        commands: list[Command] = []
        for job, hit in zip(table.jobs[chosen[starts]].tolist(), hits[starts].tolist(), strict=True):
            if job.status is JobStatus.WAITING:
                cached = view.prefix.admit(job, hit) if view.prefix is not None else 0
                job.num_computed_tokens = job.num_shared_tokens = cached
                admitted = job.num_prompt_tokens + job.num_output_tokens
                counts.num_admitted_tokens += admitted
                counts.num_cached_tokens += cached
                counts.num_computed_tokens += admitted - cached
                commands.append(Admit(job.job_id, job.all_token_ids(), job.worker_sampling,
                                      num_generated=job.num_output_tokens, num_cached_tokens=cached))
                # admit_step_id: the plan being made.
                self._set_status(job, JobStatus.RUNNING, now_s, worker_id=view.worker_id,
                                 admit_step_id=view.next_step_id)
            else:
                if job.kv is KvPlace.NONE:
                    counts.num_computed_tokens += job.num_tokens  # a recompute after a drop
                commands.append(Resume(job.job_id))
                self._set_status(job, JobStatus.RUNNING, now_s)
        return commands

    def _advance(self, view: WorkerView, chosen: np.ndarray, feed: np.ndarray) -> tuple[dict[str, int], set[str]]:
        """Projects the step onto the jobs it feeds: (plan chunks, jobs that output a token)."""
        table = self.table
        fed = feed > 0
        slots, n = chosen[fed], feed[fed]
        # The table's token counts are the jobs' own: only this projection and ``_put`` change
        # them (a report confirms one pending token per output, which leaves the count as is).
        num_tokens, num_computed = table.num_tokens[slots], table.num_computed_tokens[slots]
        out = num_computed + n == num_tokens
        chunk = num_tokens - num_computed > 1
        chunks: dict[str, int] = {}
        outputs: set[str] = set()
        for job, k, o, c in zip(table.jobs[slots].tolist(), n.tolist(), out.tolist(), chunk.tolist(), strict=True):
            job.num_computed_tokens += k
            if view.prefix is not None:  # the blocks the worker allocates for the feed
                view.prefix.resize(job, blocks_for(job.num_computed_tokens, view.capacity.block_size))
            if c:
                chunks[job.job_id] = k
            if o:
                job.num_pending_outputs += 1
                outputs.add(job.job_id)
        table.num_computed_tokens[slots] = num_computed + n
        table.num_tokens[slots] = num_tokens + out
        table.is_stale[slots] = True
        return chunks, outputs

    # ----------------------------------------------------------------- helpers

    def _set_status(self, job: Job, status: JobStatus, now_s: float, **fields) -> None:
        """Every status change of a job goes through here: the job's own fields
        (:meth:`Job.transition`, which refuses a change ``TRANSITIONS`` does not allow), then
        what the core keeps beside it: the waiting queue and its routes, the worker's jobs,
        its prefix mirror (a release, a KV move, a resume: the worker's blocks change there at
        the same point of the plans), and the job's table row (a finished job leaves the table)."""
        before = job.status
        held_by = job.worker_id if before in _ON_WORKER else None
        mirror = self.workers[held_by].prefix if held_by in self.workers else None
        if mirror is not None:
            self._mirror_release(mirror, job, status, fields)
        job.transition(status, now_s, **fields)
        if mirror is not None and held_by is not None and status in _ON_WORKER and job.kv is not KvPlace.NONE:
            # A KV move or a resume: the job's device blocks, its shared prefix included.
            bs = self.workers[held_by].capacity.block_size
            private = blocks_for(job.num_private_tokens, bs) if status is JobStatus.RUNNING \
                else held_device_blocks(job, bs)
            mirror.resize(job, job.num_shared_tokens // bs + private)
        if before is JobStatus.WAITING and status is not JobStatus.WAITING:
            del self.waiting[job.job_id]
            self.router.unroute(job.job_id)
        elif status is JobStatus.WAITING:
            self.waiting[job.job_id] = job
        if held_by is not None and status not in _ON_WORKER:
            view = self.workers.get(held_by)  # None: the worker is gone (``remove_worker``)
            if view is not None:
                view.jobs.pop(job.job_id)
        elif held_by is None and status in _ON_WORKER:
            assert job.worker_id is not None  # a job on a worker knows which
            self.workers[job.worker_id].jobs[job.job_id] = job
        if status is JobStatus.FINISHED:
            self.jobs.pop(job.job_id, None)
            self.table.discard(job)
            self.hash_memo.drop(job.job_id)
        else:
            self._put(job)

    @staticmethod
    def _mirror_release(mirror: PrefixMirror, job: Job, status: JobStatus, fields: dict) -> None:
        """A job leaving its worker, or dropping its KV there, releases its blocks in the
        mirror (before the transition, which forgets its computed tokens)."""
        drops = status is JobStatus.PAUSED and fields.get("kv") is KvPlace.NONE
        if status in _ON_WORKER and not drops:
            return
        finished = status is JobStatus.FINISHED and fields.get("reason") is not FinishReason.ABORTED
        mirror.release(job, finished=finished, on_device=job.kv is KvPlace.DEVICE, leaves=not drops)

    def _put(self, job: Job) -> None:
        """Brings the job's row of the table in line with it (every change goes through here)."""
        view = self.workers.get(job.worker_id) if job.worker_id is not None else None
        owner = view.index if view is not None else WAITING
        host = held_host_blocks(job, view.capacity.block_size) if view is not None else 0
        hint = 0
        if job.status is JobStatus.WAITING:  # its prefill is what no worker has cached
            hint = max((v.prefix.lookup(job)[0] for v in self.workers.values() if v.prefix is not None), default=0)
        self.table.put(job, owner, self.policy.estimate_of(job), host, hint)

    def _to_waiting(self, job: Job, now_s: float) -> None:
        self._set_status(job, JobStatus.WAITING, now_s)

    def _finish(self, job: Job, reason: FinishReason, now_s: float) -> None:
        self._set_status(job, JobStatus.FINISHED, now_s, reason=reason)
        if reason is FinishReason.ABORTED:
            self.num_cancelled += 1
        else:
            self.num_finished += 1

    def num_with_status(self, status: JobStatus) -> int:
        return sum(1 for job in self.jobs.values() if job.status is status)

