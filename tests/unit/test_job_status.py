"""Job status: the allowed transitions, the fields each status implies, and the job table's
rows, which must agree with the jobs whatever the core does to them."""

from __future__ import annotations

import copy

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from alise.core.blocks import WorkerCapacity, held_host_blocks
from alise.core.commands import Refusal
from alise.core.config import SchedulingConfig
from alise.core.job import TRANSITIONS, FinishReason, JobStatus, KvPlace, LengthEstimate, TransitionError
from alise.core.memory_planner import make_memory_planner
from alise.core.policy import make_policy
from alise.core.scheduler import SchedulerCore
from alise.core.table import FREE, WAITING
from alise.tools.sim.virtual_worker import virtual_worker
from corekit import LATENCY, make_job

#: The keywords each transition takes (``Job.transition``).
_ARGS = {
    JobStatus.WAITING: {},
    JobStatus.RUNNING: {},
    JobStatus.PAUSED: {"kv": KvPlace.HOST_INT8},
    JobStatus.FINISHED: {"reason": FinishReason.STOP},
}


def _args(job, status):
    if job.status is JobStatus.WAITING and status is JobStatus.RUNNING:
        return {"worker_id": "w0", "admit_step_id": 7}
    return _ARGS[status]


def assert_status_fields(job) -> None:
    """What each status implies of a job's other fields."""
    if job.status is JobStatus.WAITING:
        assert (job.kv, job.worker_id, job.num_computed_tokens, job.num_pending_outputs) == (
            KvPlace.NONE, None, 0, 0), job
    elif job.status is JobStatus.RUNNING:
        assert job.kv is KvPlace.DEVICE and job.worker_id is not None, job
    elif job.status is JobStatus.PAUSED:
        assert job.worker_id is not None and (job.kv is not KvPlace.NONE or job.num_computed_tokens == 0), job
    else:
        assert job.kv is KvPlace.NONE and job.num_pending_outputs == 0, job
        assert job.finish_reason is not None and job.finish_s is not None, job


def test_a_refused_transition_says_why_and_changes_nothing():
    job = make_job("j", 4)
    job.transition(JobStatus.FINISHED, 1.0, reason=FinishReason.ABORTED)
    before = copy.deepcopy(job)
    with pytest.raises(TransitionError, match=r"job j: cannot go from finished to running \(from finished: "
                                              r"nothing\)"):
        job.transition(JobStatus.RUNNING, 2.0)
    job = make_job("k", 4)
    with pytest.raises(TransitionError, match="job k: cannot go from waiting to paused"):
        job.transition(JobStatus.PAUSED, 1.0, kv=KvPlace.DEVICE)
    with pytest.raises(TransitionError, match="waiting -> running takes admit_step_id, worker_id, "
                                              "got worker_id"):
        job.transition(JobStatus.RUNNING, 1.0, worker_id="w0")
    with pytest.raises(TransitionError, match="waiting -> finished takes reason, got kv, reason"):
        job.transition(JobStatus.FINISHED, 1.0, kv=KvPlace.NONE, reason=FinishReason.STOP)
    assert job == make_job("k", 4) and before.status is JobStatus.FINISHED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(JobStatus)), st.floats(0.0, 5.0)), max_size=12))
def test_random_transitions_set_what_each_status_implies(moves):
    """Allowed changes happen and leave the job as its status implies; the others raise and
    change nothing. ``queued_s`` is the time spent waiting or paused, spell by spell;
    ``scheduled_s`` the time of the first RUNNING, kept through pauses and re-queues."""
    job = make_job("j", 10, max_tokens=50)
    now, queued, idle_since, scheduled = 0.0, 0.0, 0.0, None
    for status, dt in moves:
        now += dt
        before = copy.deepcopy(job)
        if status not in TRANSITIONS[job.status]:
            with pytest.raises(TransitionError):
                job.transition(status, now, **_args(job, status))
            assert job == before
            continue
        if job.status is JobStatus.RUNNING:
            job.num_computed_tokens, job.num_pending_outputs = 12, 1  # a step was planned
        was = job.status
        job.transition(status, now, **_args(job, status))
        assert job.status is status
        assert_status_fields(job)
        if was in (JobStatus.WAITING, JobStatus.PAUSED) and status is not was:
            queued += now - idle_since
        if status in (JobStatus.WAITING, JobStatus.PAUSED) and status is not was:
            idle_since = now
        assert job.queued_s == pytest.approx(queued) and job.idle_since_s == idle_since
        if status is JobStatus.RUNNING and scheduled is None:
            scheduled = now
        assert job.scheduled_s == scheduled
        preempted = was is JobStatus.RUNNING and status is JobStatus.PAUSED
        assert job.num_preemptions == before.num_preemptions + preempted


# --------------------------------------------------------------------------- core and table

BS = 4


class Cluster:
    """A core with lock-step virtual workers, plans in flight on each."""

    def __init__(self, policy: str) -> None:
        self.core = SchedulerCore(make_policy(SchedulingConfig(policy=policy), LATENCY),
                                  make_memory_planner("adaptive", LATENCY, block_bytes=1 << 16))
        self.workers, self.in_flight, self.serial = {}, {}, 0
        for _ in range(2):
            self.connect()

    def connect(self) -> None:
        self.serial += 1
        worker_id = f"w{self.serial}"
        self.core.add_worker(WorkerCapacity(worker_id, BS, 12, 8, 200, 3, 64, block_bytes=1 << 16))
        self.workers[worker_id] = virtual_worker(num_device_blocks=12, num_host_blocks=8, block_size=BS,
                                                 max_model_len=200, latency=LATENCY, block_bytes=1 << 16)
        self.in_flight[worker_id] = []

    def plan(self, worker_id: str, now: float) -> None:
        worker = self.workers[worker_id]
        worker.abort(*self.core.take_aborts(worker_id))
        plan = self.core.schedule(worker_id, now)
        if not plan.is_empty:
            self.in_flight[worker_id].append(worker.run(plan))

    def report(self, worker_id: str, now: float, refuse: bool) -> None:
        if not self.in_flight[worker_id]:
            return
        report = self.in_flight[worker_id].pop(0)
        view = self.core.workers[worker_id]
        # A refused job takes no part in the steps after it: refuse one only when no later
        # step has run (the worker's plans run before their reports are read).
        if refuse and view.jobs and not self.in_flight[worker_id]:
            report.refused.append(Refusal(sorted(view.jobs)[0], "resume", "refused by the test"))
        self.core.apply_report(worker_id, report, now)

    def lose(self, worker_id: str, now: float) -> None:
        self.core.remove_worker(worker_id, now)
        del self.workers[worker_id], self.in_flight[worker_id]
        self.connect()


def assert_rows_agree(core: SchedulerCore) -> None:
    """Each unfinished job's table row is the job (and nothing else holds a slot); the
    waiting queue and the workers' job lists are the jobs in those statuses."""
    table = core.table
    assert set(table.slot_of) == set(core.jobs)
    assert (table.owner != FREE).sum() == len(core.jobs)
    views = {view.worker_id: view for view in core.workers.values()}
    for job in core.jobs.values():
        assert_status_fields(job)
        slot = table.slot_of[job.job_id]
        view = views.get(job.worker_id)
        estimate = core.policy.estimate_of(job)
        row = {name: getattr(table, name)[slot].item() for name in (
            "owner", "is_running", "arrival_s", "queued_s", "idle_since_s", "num_prompt_tokens", "num_tokens",
            "num_computed_tokens", "max_tokens", "estimate_mean", "estimate_p90", "num_host_blocks")}
        assert row == {
            "owner": WAITING if job.status is JobStatus.WAITING else view.index,
            "is_running": job.status is JobStatus.RUNNING, "arrival_s": job.arrival_s,
            "queued_s": job.queued_s,
            # a running job's row ages by nothing: its wait has no start
            "idle_since_s": float("inf") if job.status is JobStatus.RUNNING else job.idle_since_s,
            "num_prompt_tokens": job.num_prompt_tokens,
            "num_tokens": job.num_tokens, "num_computed_tokens": job.num_computed_tokens,
            "max_tokens": job.sampling.max_tokens, "estimate_mean": estimate.mean,
            "estimate_p90": estimate.p90,
            "num_host_blocks": held_host_blocks(job, BS),
        }, job.job_id
        assert (job.job_id in core.waiting) == (job.status is JobStatus.WAITING)
        for other in views.values():
            assert (job.job_id in other.jobs) == (other is view and job.status is not JobStatus.WAITING)
    assert all(job_id in core.jobs for view in views.values() for job_id in view.jobs)


_OPS = ("submit",) * 3 + ("plan",) * 4 + ("report",) * 3 + ("cancel", "estimate", "refuse", "lose")


def run_ops(policy: str, ops: list[tuple[str, int, int, int]]) -> SchedulerCore:
    """Drives a cluster through ``ops`` ((op, which worker, size, out) each), checking the rows
    after every change, then plans and reports on every worker until no job is left: every job
    runs to its end. Returns the core."""
    cluster = Cluster(policy)
    core = cluster.core
    for t, (op, which, size, out) in enumerate(ops):
        now = 0.01 * t
        worker_id = sorted(cluster.workers)[which]
        jobs = sorted(core.jobs)
        if op == "submit":
            predicted = float(out * size % 37)
            core.submit(make_job(f"j{t}", size, max_tokens=out, arrival_s=now, predicted=predicted))
        elif op == "plan":
            cluster.plan(worker_id, now)
        elif op in ("report", "refuse"):
            cluster.report(worker_id, now, refuse=op == "refuse")
        elif op == "cancel" and jobs:
            core.cancel(jobs[size % len(jobs)], now)
        elif op == "estimate" and jobs:
            core.update_estimate(jobs[size % len(jobs)], LengthEstimate(out, out, 2 * out, "test"))
        elif op == "lose":
            cluster.lose(worker_id, now)
        assert_rows_agree(core)
    for t in range(len(ops), len(ops) + 3000):  # every job still runs to its end
        if not core.jobs:
            break
        for worker_id in sorted(cluster.workers):
            cluster.plan(worker_id, 0.01 * t)
            cluster.plan(worker_id, 0.01 * t)
            cluster.report(worker_id, 0.01 * t, refuse=False)
        assert_rows_agree(core)
    left = {job.job_id: (job.status.value, job.num_tokens) for job in core.jobs.values()}
    assert not core.jobs and not core.waiting and not len(core.table), f"left (status, tokens): {left}"
    return core


#: A job runs on w1 to 37 + 8 = 45 tokens, 12 blocks of 4: the whole cache (max_model_len 200 is
#: capped at 48 tokens). w1 is lost; the job, re-queued, needs all 12 blocks of an empty worker
#: again, and under alise its growth reserve (0.1 x its 8 estimated tokens left: 0.2 blocks)
#: asked for room beside them, which no worker ever has: it waited forever.
_RUN_THEN_LOSE = [("submit", 0, 37, 33), *[("plan", 0, 1, 1), ("report", 0, 1, 1)] * 8, ("lose", 0, 1, 1)]


@pytest.mark.parametrize("policy", ["fcfs", "alise"])
def test_a_job_requeued_with_the_whole_cache_to_fill_runs_again(policy):
    core = run_ops(policy, _RUN_THEN_LOSE)
    assert core.num_finished == 1


@pytest.mark.parametrize("policy", ["fcfs", "alise"])
def test_a_job_whose_prompt_fills_the_whole_cache_is_admitted(policy):
    """A 45-token prompt needs all 12 blocks of 4 (max_model_len 48): it runs alone on an
    empty worker. It can never grow past the whole cache, so its growth reserve (0.1 x 33
    tokens left: 0.825 blocks) holds nothing back beside it."""
    cluster = Cluster(policy)
    core = cluster.core
    core.submit(make_job("j", 45, max_tokens=33, arrival_s=0.0, predicted=33.0))
    for worker_id in sorted(cluster.workers):
        cluster.plan(worker_id, 0.0)
    assert core.jobs["j"].status is JobStatus.RUNNING
    view = core.workers[core.jobs["j"].worker_id]
    assert view.num_free_device_blocks == 0 and core.jobs["j"].num_computed_tokens == 45


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["fcfs", "alise"]), st.lists(st.tuples(
    st.sampled_from(_OPS), st.integers(0, 1), st.integers(1, 40), st.integers(1, 40)),
    min_size=20, max_size=150))
# A job refused, run to 45 tokens (the whole cache) and re-queued when its worker is lost.
@example("alise", [("submit", 0, 37, 33), ("plan", 0, 1, 1), ("plan", 0, 1, 1), ("refuse", 0, 1, 1),
                   ("plan", 0, 1, 1), ("plan", 0, 1, 1), ("plan", 0, 1, 1), ("report", 0, 1, 1),
                   ("refuse", 0, 1, 1), ("report", 0, 1, 1), ("plan", 0, 1, 1), ("refuse", 0, 1, 1),
                   ("plan", 0, 1, 1), ("plan", 0, 1, 1), ("report", 0, 1, 1), ("report", 0, 1, 1),
                   ("report", 0, 1, 1), ("lose", 0, 1, 1)])
def test_the_table_rows_agree_with_the_jobs_through_random_transitions(policy, ops):
    """Jobs arrive, start, pause (their KV kept, quantized, swapped or dropped), resume, finish,
    are cancelled, refused, or lost with their worker, in a random order, with up to several
    plans in flight: after every change the table rows and the jobs agree, and every job
    runs to its end."""
    run_ops(policy, ops)
