"""Reports that come back after their job left the worker and was admitted there again: what
such a report says of the job belongs to its earlier stay and is skipped, not held against
the worker (no gRPC, no torch)."""

from __future__ import annotations

from alise.core.commands import AbortJobs, Admit, Refusal, StepPlan
from alise.core.dispatch import keep_in_flight
from alise.core.job import JobStatus
from corekit import make_job, make_scheduler, step


def test_a_late_output_of_a_job_readmitted_to_the_same_worker_is_skipped():
    """Steps a and b are in flight, both feeding j to a token; the worker has run both when
    a's report comes back refusing a command of j. j goes back to the queue and the next round
    aborts it (through b) and admits it again on the same worker, in plan c. b's report then
    brings j's token of its earlier stay: the core skips it (j's stay began with c), keeps the
    worker, and j's stream goes on from its confirmed tokens with no gap or repeat."""
    core, worker = make_scheduler("fcfs", num_blocks=64, block_size=4)
    core.submit(make_job("j", 6, max_tokens=12))
    _, events = step(core, worker)
    a, b = core.schedule("w0", 1.0), core.schedule("w0", 1.0)
    assert core.num_in_flight("w0") == 2
    report_a, report_b = worker.run(a), worker.run(b)
    assert [o.job_id for o in report_b.outputs] == ["j"]
    # As the worker reports a KV move it could not make (the job stays where it was).
    report_a.refused.append(Refusal("j", "resume", "no free host block"))
    assert core.apply_report("w0", report_a, 1.0) == []
    assert core.jobs["j"].status is JobStatus.WAITING

    abort, c = keep_in_flight(core, "w0", 1.0, plans_ahead=2)
    assert isinstance(abort, AbortJobs) and abort.job_ids == ("j",) and abort.through_step_id == b.step_id
    assert isinstance(c, StepPlan) and [cmd.job_id for cmd in c.commands if isinstance(cmd, Admit)] == ["j"]
    job = core.jobs["j"]
    assert job.worker_id == "w0" and job.admit_step_id == c.step_id > b.step_id

    assert core.apply_report("w0", report_b, 1.0) == []  # b's token is of j's earlier stay
    assert "w0" in core.workers and job.num_output_tokens == 1
    worker.abort(abort.job_ids, abort.through_step_id)
    events += core.apply_report("w0", worker.run(c), 1.0)
    while job.status is not JobStatus.FINISHED:
        plan, more = step(core, worker, 2.0)
        assert not plan.is_empty
        events += more
    assert [e.index for e in events] == list(range(12))
    assert [t for e in events for t in e.token_ids] == job.output_token_ids
    assert events[-1].finish_reason is not None and not worker.seqs
