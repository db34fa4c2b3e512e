"""A worker and the scheduler core agree on the worker's jobs and blocks, whatever the timing
of cancels against the plans in flight (the core against the worker's own engine, with the
stream between them modelled message by message; no gRPC, no torch)."""

from __future__ import annotations

from collections import deque
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alise.core.commands import AbortJobs, Admit, StepPlan
from alise.core.dispatch import keep_in_flight
from alise.core.sampling import SamplingParams
from corekit import make_job, make_scheduler

NUM_BLOCKS = 40


class Stream:
    """The scheduler -> worker stream (what ``keep_in_flight`` returns, in order) and the
    worker's two queues, as its step thread keeps them: plans in order, aborts applied at the
    next step boundary ahead of them."""

    def __init__(self, core, worker, depth: int, census: bool) -> None:
        self.core, self.worker, self.depth, self.census = core, worker, depth, census
        self.wire: deque = deque()       # scheduler -> worker, in order
        self.plans: deque = deque()      # received, not run
        self.aborts: deque = deque()     # received, not applied
        self.reports: deque = deque()    # worker -> scheduler
        self.tokens: dict[str, int] = {}

    def dispatch(self, now: float) -> None:
        self.wire.extend(keep_in_flight(self.core, "w0", now, plans_ahead=self.depth, census=self.census))

    def receive(self) -> None:
        match self.wire.popleft():
            case StepPlan() as plan:
                self.plans.append(plan)
            case AbortJobs() as aborts:
                self.aborts.append(aborts)

    def apply_aborts(self) -> None:
        while self.aborts:
            aborts = self.aborts.popleft()
            self.worker.abort(aborts.job_ids, aborts.through_step_id)

    def run_step(self) -> None:
        self.apply_aborts()
        report = self.worker.run(self.plans.popleft())
        assert not [r for r in report.refused if r.command in ("step", "chunk")], report.refused
        self.reports.append(report)

    def apply(self, now: float) -> None:
        for event in self.core.apply_report("w0", self.reports.popleft(), now):
            assert event.index == self.tokens.get(event.job_id, 0), "a gap or a repeat"
            self.tokens[event.job_id] = event.index + len(event.token_ids)

    def can(self, action: str) -> bool:
        return bool({"receive": self.wire, "step": self.plans, "apply": self.reports}[action])


@pytest.mark.parametrize("census", [True, False])
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=10),
       st.integers(2, 3), st.data())
def test_cancels_at_any_moment_leave_no_job_on_the_worker(census, jobs, depth, data):
    """Jobs are cancelled at random moments against plans in flight, in the wire, in the
    worker's queue or being run: the worker never holds a job the scheduler does not know
    beyond the abort's reach (with a census every step, each census agrees), and once the
    stream is drained the worker holds nothing and every block is free."""
    core, worker = make_scheduler("alise", num_blocks=NUM_BLOCKS, block_size=4, max_num_seqs=4,
                                  max_model_len=160)
    stream = Stream(core, worker, depth, census)
    for i, (prompt, out) in enumerate(jobs):
        core.submit(make_job(f"j{i}", prompt, max_tokens=out, arrival_s=i * 0.01))
    actions = ["cancel", "dispatch", "receive", "step", "apply"]
    for t in range(2000):
        now = t * 0.01
        action = data.draw(st.sampled_from(actions))
        if action == "cancel":
            if core.jobs:
                core.cancel(data.draw(st.sampled_from(sorted(core.jobs))), now)
        elif action == "dispatch":
            stream.dispatch(now)
        elif stream.can(action):
            {"receive": stream.receive, "step": stream.run_step, "apply": partial(stream.apply, now)}[action]()
        d = core.workers["w0"].disagreements
        assert (d.num_ghosts, d.num_missing, d.num_block_deficits) == (0, 0, 0)
        if not core.jobs and not (stream.wire or stream.plans or stream.reports):
            break
    for job_id in sorted(core.jobs):  # the rest leave too
        core.cancel(job_id, 99.0)
    stream.dispatch(99.0)
    while stream.wire or stream.plans or stream.reports or stream.aborts:
        if stream.wire:
            stream.receive()
        elif stream.plans:
            stream.run_step()
        elif stream.aborts:
            stream.apply_aborts()
        else:
            stream.apply(99.0)
    assert not worker.seqs, f"jobs left on the worker: {sorted(worker.seqs)}"
    assert worker.allocator.num_free == NUM_BLOCKS
    assert core.workers["w0"].num_free_device_blocks == NUM_BLOCKS
    d = core.workers["w0"].disagreements
    assert (d.num_ghosts, d.num_missing, d.num_block_deficits) == (0, 0, 0)
    assert d.num_censuses > 0 or not census


def test_an_abort_that_overtakes_the_admit_cancels_it():
    """The job is admitted in plan 1, cancelled while plan 1 waits in the worker's queue:
    the abort (through plan 1) is applied first, so the admit is skipped; it does not run
    as a job the scheduler no longer knows."""
    core, worker = make_scheduler("fcfs", num_blocks=NUM_BLOCKS, block_size=4)
    core.submit(make_job("late", 8, max_tokens=50))
    plan = core.schedule("w0", 0.0)
    assert [c.job_id for c in plan.commands if isinstance(c, Admit)] == ["late"]
    core.cancel("late", 0.1)
    ids, through = core.take_aborts("w0")
    assert (ids, through) == (["late"], 1)
    worker.abort(ids, through)   # the boundary before plan 1 runs
    report = worker.run(plan)
    assert not worker.seqs and not report.outputs and not report.refused
    assert worker.aborted == {}  # forgotten once plan 1 has run


def test_a_census_aborts_a_ghost_and_recomputes_a_missing_job():
    """Behind the scheduler's back the worker gains a job and loses one in mid-prefill
    (no report expects a token from it): the next census finds both, the ghost is aborted
    there, the missing job goes back to the queue and finishes with its tokens in order,
    and the block counts agree again."""
    core, worker = make_scheduler("fcfs", num_blocks=NUM_BLOCKS, block_size=4, max_num_seqs=2,
                                  max_num_batched_tokens=4)
    stream = Stream(core, worker, depth=2, census=True)
    core.submit(make_job("kept", 2, max_tokens=12))
    core.submit(make_job("lost", 30, max_tokens=12, arrival_s=0.1))
    for _ in range(2):
        stream.dispatch(0.0)
        while stream.wire:
            stream.receive()
        while stream.plans:
            stream.run_step()
        while stream.reports:
            stream.apply(0.0)
    worker.apply([Admit("ghost", [1, 2, 3], SamplingParams(max_tokens=50))])
    worker._release(worker.seqs["lost"])
    for t in range(60):
        stream.dispatch(t)
        while stream.wire:
            stream.receive()
        while stream.plans:
            stream.run_step()
        while stream.reports:
            stream.apply(t)
        if not core.jobs:
            break
    d = core.workers["w0"].disagreements
    assert (d.num_ghosts, d.num_missing) == (1, 1)
    assert stream.tokens == {"kept": 12, "lost": 12}
    assert not worker.seqs and worker.allocator.num_free == NUM_BLOCKS
