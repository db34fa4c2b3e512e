"""A job's projected token counts live in its job table row while the table holds it: the job
reads and writes them there, a confirmed output is one pending output fewer, and a job that
leaves the table (or a copy of one in it) keeps them; a copy of a whole table reads its own rows."""

from __future__ import annotations

import copy
import pickle

from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.policy import RemainingTimeEstimator
from alise.core.sampling import SamplingParams
from alise.core.table import WAITING, JobTable
from corekit import make_job as corekit_job
from corekit import make_scheduler, step

ESTIMATE = LengthEstimate(4, 4, 8)


def make_table(capacity: int = 2) -> JobTable:
    return JobTable(RemainingTimeEstimator(LatencyModel()), capacity=capacity)


def make_job(job_id: str, **fields) -> Job:
    return Job(job_id, [1, 2, 3], SamplingParams(max_tokens=8), arrival_s=0.0, **fields)


def test_a_job_in_the_table_reads_and_writes_its_row() -> None:
    table = make_table()
    job = make_job("a", output_token_ids=[7], num_pending_outputs=2, num_computed_tokens=4)
    table.put(job, WAITING, ESTIMATE)
    slot = table.slot_of["a"]
    assert job.row == (table, slot)
    assert (int(table.num_tokens[slot]), int(table.num_computed_tokens[slot])) == (6, 4)
    # A plan's projection writes the row alone (``_advance``); the job reads it.
    table.num_tokens[slot] += 1
    table.num_computed_tokens[slot] = 6
    assert (job.num_tokens, job.num_pending_outputs, job.num_computed_tokens, job.num_generated) == (7, 3, 6, 4)
    # A report confirms a pending token: the output list grows, the row stays.
    job.output_token_ids.append(9)
    assert (job.num_tokens, job.num_pending_outputs) == (7, 2)
    job.num_pending_outputs = 0
    job.num_computed_tokens = 0
    assert (int(table.num_tokens[slot]), int(table.num_computed_tokens[slot])) == (5, 0)


def test_a_job_keeps_its_counts_when_it_leaves_and_through_growth() -> None:
    table = make_table(capacity=1)
    first, job = make_job("a"), make_job("b")
    table.put(first, WAITING, ESTIMATE)
    table.put(job, WAITING, ESTIMATE)  # the table grows: its columns are new arrays
    slot = table.slot_of["b"]
    table.num_tokens[slot] += 2
    table.num_computed_tokens[slot] = 3
    table.discard(job)
    assert job.row is None
    assert (job.num_tokens, job.num_pending_outputs, job.num_computed_tokens) == (5, 2, 3)
    table.put(make_job("c"), WAITING, ESTIMATE)  # takes the freed slot
    assert (job.num_pending_outputs, job.num_computed_tokens) == (2, 3)
    assert (first.num_pending_outputs, first.num_computed_tokens) == (0, 0)


def test_a_copy_of_a_job_in_a_table_holds_its_counts_itself() -> None:
    table = make_table()
    job = make_job("a", num_pending_outputs=1, num_computed_tokens=2)
    table.put(job, WAITING, ESTIMATE)
    for other in (copy.deepcopy(job), pickle.loads(pickle.dumps(job))):
        assert other.row is None and other == job
        assert (other.num_pending_outputs, other.num_computed_tokens) == (1, 2)
        other.num_computed_tokens = 0  # the original's row is not the copy's
        assert job.num_computed_tokens == 2


def test_a_copy_of_a_core_keeps_its_jobs_counts_in_its_own_table() -> None:
    """A deep copy (or a pickle) of a running core goes on exactly as the core does: each copied
    job reads and writes the copied table's row, which the copy's plans project onto."""
    core, worker = make_scheduler(num_blocks=16)
    for i in range(3):
        core.submit(corekit_job(f"j{i}", 20 + i, max_tokens=12))
    step(core, worker)
    step(core, worker)
    other, other_worker = copy.deepcopy((core, worker))
    for copied in (other, pickle.loads(pickle.dumps(core))):
        for job_id, slot in copied.table.slot_of.items():
            assert copied.jobs[job_id].row == (copied.table, slot)
    for _ in range(3):
        step(core, worker)
        step(other, other_worker)
    for job_id, job in core.jobs.items():
        copied = other.jobs[job_id]
        assert (copied.num_tokens, copied.num_pending_outputs, copied.num_computed_tokens) == \
            (job.num_tokens, job.num_pending_outputs, job.num_computed_tokens) != (0, 0, 0)
        assert copied.output_token_ids == job.output_token_ids
