"""The scheduler core: which jobs run on which worker, step by step.

Pure Python and numpy: no gRPC, no torch. The scheduler service, the tests and the simulator
all drive this same class. The parts, each with one job:

* :class:`~alise.core.table.JobTable`   every unfinished job as numpy columns (the queue);
* the policy (``alise.core.policy``)     keys the candidates (ranking);
* :func:`~alise.core.admission.select`   who runs within the step's budgets (admission);
* :class:`~alise.core.routing.Router`    which worker a waiting job goes to;
* the memory planner                     where each paused job's KV goes;
* :class:`~alise.core.planner.StepPlanner` one worker's next step, in named phases;
* :mod:`~alise.core.reports`             report checking and the plans in flight.

Planning runs ahead of the workers: ``schedule`` plans a worker's next step on top of every
step already planned for it, before their reports are in (``alise.core.planner``). The engine
keeps a few plans in flight per worker, so a worker always has its next plan when a step ends.

This class holds the state and is its one writer: membership, reports, and every status
change of a job (``_set_status``), which keeps the waiting queue, the workers' jobs, the job
table and the prefix mirrors in line. A worker with prefix caching has a mirror of its cache
here (``alise.core.prefix_mirror``), which follows every admit, step, KV move and release of
the plans in the order the worker applies them.
"""

from __future__ import annotations

import logging
from collections import Counter

from alise.core.blocks import WorkerCapacity, blocks_for, held_device_blocks, held_host_blocks
from alise.core.census import CensusFindings, check_census
from alise.core.commands import HeldJob, StepPlan, StepReport, TokenEvent
from alise.core.config import SchedulingConfig
from alise.core.job import FinishReason, Job, JobStatus, KvPlace, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.memory_planner import MemoryPlanner, make_memory_planner
from alise.core.planner import StepPlanner
from alise.core.policy import Policy, RemainingTimeEstimator
from alise.core.prefix_mirror import HashMemo, PrefillCounts, PrefixMirror
from alise.core.reports import check_report, job_at, strike
from alise.core.routing import Router
from alise.core.table import WAITING, JobTable
from alise.core.worker_view import WorkerView

logger = logging.getLogger(__name__)

#: Statuses of a job that a worker holds (it is in that ``WorkerView.jobs``).
_ON_WORKER = frozenset({JobStatus.RUNNING, JobStatus.PAUSED})
#: Read on every status change (a module global is read faster than an enum's member).
_WAITING, _RUNNING, _FINISHED = JobStatus.WAITING, JobStatus.RUNNING, JobStatus.FINISHED
_NO_KV, _DEVICE = KvPlace.NONE, KvPlace.DEVICE


class SchedulerCore:
    def __init__(self, policy: Policy, memory: MemoryPlanner | None = None, *,
                 latency: LatencyModel | None = None,
                 prefill_step_ratio: float = SchedulingConfig.prefill_step_ratio) -> None:
        self.policy = policy
        latency = latency or policy.latency or LatencyModel()
        self.estimator = RemainingTimeEstimator(latency, overrun_growth=policy.overrun_growth)
        # fcfs is vLLM's behaviour: recompute preemption. The speculative policies plan KV moves.
        memory = memory or make_memory_planner("drop" if not policy.preemptive else "adaptive", latency)
        self.table = JobTable(self.estimator)
        self.router = Router(self.table)
        self.jobs: dict[str, Job] = {}
        self.waiting: dict[str, Job] = {}
        self.workers: dict[str, WorkerView] = {}
        self._next_index = 0
        self.num_finished = 0
        self.num_cancelled = 0
        self.hash_memo = HashMemo()
        self.planner = StepPlanner(self.table, policy, self.estimator, memory, self.router, self.workers,
                                   self._set_status, prefill_step_ratio)

    @property
    def latency(self) -> LatencyModel:
        return self.estimator.latency

    @property
    def preemptions(self) -> Counter[str]:
        """Preemptions the plans made, by action."""
        return self.planner.preemptions

    @property
    def kv_moves(self) -> Counter[str]:
        """KV moves the plans made, by kind (keep, int8, int4, swap, swap-int8, swap-int4, drop,
        prefetch)."""
        return self.planner.kv_moves

    @property
    def prefill(self) -> PrefillCounts:
        """Tokens admitted, found in a prefix cache, and computed by prefills (recomputes too)."""
        return self.planner.prefill

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
        self.prefill.count_stand_ins(report.num_admit_stand_in_tokens, report.num_resume_stand_in_tokens)
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
            # NOTE: the job is in the table (as every job on a worker): one more confirmed token
            # is one pending token fewer (``alise.core.job.PendingOutputs``).
            job.output_token_ids.extend(out.token_ids)
            if job.first_token_s is None:
                job.first_token_s = now_s
            events.append(TokenEvent(job.job_id, list(out.token_ids), index, out.finish_reason, out.logprobs))
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
        return self.planner.schedule(self.workers[worker_id], now_s, census=census)

    # ----------------------------------------------------------------- helpers

    def _set_status(self, job: Job, status: JobStatus, now_s: float, **fields) -> None:
        """Every status change of a job goes through here: the job's own fields
        (:meth:`Job.transition`, which refuses a change ``TRANSITIONS`` does not allow), then
        what the core keeps beside it: the waiting queue and its routes, the worker's jobs,
        its prefix mirror (a release, a KV move, a resume: the worker's blocks change there at
        the same point of the plans), and the job's table row (a finished job leaves the table)."""
        before = job.status
        held_by = job.worker_id if before in _ON_WORKER else None
        workers = self.workers
        view = workers.get(held_by) if held_by is not None else None  # None: gone (``remove_worker``)
        mirror = view.prefix if view is not None else None
        if mirror is not None:
            self._mirror_release(mirror, job, status, fields)
        job.transition(status, now_s, **fields)
        on_worker = status in _ON_WORKER
        if mirror is not None and on_worker and job.kv is not _NO_KV:
            # A KV move or a resume: the job's device blocks, its shared prefix included.
            bs = mirror.block_size
            private = blocks_for(job.num_private_tokens, bs) if status is _RUNNING else held_device_blocks(job, bs)
            mirror.resize(job, job.num_shared_tokens // bs + private)
        job_id = job.job_id
        if before is _WAITING:
            if status is not _WAITING:
                del self.waiting[job_id]
                self.router.unroute(job_id)
        elif status is _WAITING:
            self.waiting[job_id] = job
        if held_by is None:
            if on_worker:
                assert job.worker_id is not None  # a job on a worker knows which
                view = workers[job.worker_id]
                view.jobs[job_id] = job
        elif not on_worker:
            if view is not None:
                view.jobs.pop(job_id)
            view = None
        if status is _FINISHED:
            self.jobs.pop(job_id, None)
            self.table.discard(job)
            self.hash_memo.drop(job_id)
        else:
            self._put(job, view)

    @staticmethod
    def _mirror_release(mirror: PrefixMirror, job: Job, status: JobStatus, fields: dict) -> None:
        """A job leaving its worker, or dropping its KV there, releases its blocks in the
        mirror (before the transition, which forgets its computed tokens)."""
        drops = status is JobStatus.PAUSED and fields.get("kv") is KvPlace.NONE
        if status in _ON_WORKER and not drops:
            return
        finished = status is JobStatus.FINISHED and fields.get("reason") is not FinishReason.ABORTED
        mirror.release(job, finished=finished, on_device=job.kv is KvPlace.DEVICE, leaves=not drops)

    def _put(self, job: Job, view: WorkerView | None = None) -> None:
        """Brings the job's row of the table in line with it (every change goes through here);
        ``view``: the worker holding the job, where the caller has it (else looked up)."""
        if view is None and job.worker_id is not None:
            view = self.workers.get(job.worker_id)
        status, owner, host, hint = job.status, WAITING, 0, 0
        if view is not None:
            owner = view.index
            if job.kv is not _DEVICE:  # (a running job's KV is on the device: no host blocks)
                host = held_host_blocks(job, view.capacity.block_size)
        if status is _WAITING:  # its prefill is what no worker has cached
            hint = max((v.prefix.lookup(job)[0] for v in self.workers.values() if v.prefix is not None), default=0)
        elif job.is_dropped and view is not None and view.prefix is not None:
            # Its resume recomputes what the drop did not leave cached on its worker.
            hint = view.prefix.lookup(job)[0]
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

