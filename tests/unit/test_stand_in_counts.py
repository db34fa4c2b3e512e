"""The scheduler's prefill counts say what its worker computed: tokens the plans counted cached
but the worker lacked (stand-ins, computed in the job's next feed) come back in the step's
report and are counted computed, not cached (a real tiny model on the CPU, and the wire)."""

from __future__ import annotations

import random
from collections import deque

import pytest
from test_prefix_stand_ins import converse

from alise.common import wire
from alise.core.commands import Admit, JobOutput, Refusal, Resume, StepReport
from alise.core.job import Job, KvPlace
from alise.core.reports import InFlight, ReportError, check_report
from alise.core.sampling import SamplingParams
from alise.worker.engine import WorkerEngine
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from tinymodels import make_tiny_model_dir

#: About a tenth of the tiny model's vocabulary: a job sampling at temperature 1 stops early.
STOP_TOKEN_IDS = tuple(range(1000, 4000))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp("stand-in-counts"), "llama")), device="cpu")


def stops_early(job_id: str, max_tokens: int, rng: random.Random) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=rng.randrange(1 << 30),
                          stop_token_ids=STOP_TOKEN_IDS)


class WorkerPrefill:
    """What a worker engine computed of its sequences' prefills (the tokens a sequence held
    when it was admitted or resumed after a drop), counted from the feeds its executor ran, and
    the tokens its admits and resumes took from its prefix cache."""

    def __init__(self, engine: WorkerEngine) -> None:
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_resume_cached_tokens = 0
        self._ends: dict[str, int] = {}
        kv, executor = engine.kv, engine.executor
        start, resume, execute = kv.start, kv.resume, executor.execute

        def counted_start(seq, num_cached_tokens):
            reason = start(seq, num_cached_tokens)
            if reason is None:
                self._ends[seq.job_id] = len(seq.token_ids)
                self.num_cached_tokens += seq.num_cached - seq.num_missing
            return reason

        def counted_resume(seq, num_cached_tokens=0):
            dropped = seq.place is KvPlace.NONE
            reason = resume(seq, num_cached_tokens)
            if reason is None and dropped:
                self._ends[seq.job_id] = len(seq.token_ids)
                self.num_resume_cached_tokens += seq.num_cached - seq.num_missing
            return reason

        def counted_execute(feeds):
            for f in feeds:
                end = self._ends.get(f.seq.job_id, 0)
                self.num_computed_tokens += max(0, min(f.start + f.num_tokens, end) - f.start)
            return execute(feeds)

        kv.start, kv.resume, executor.execute = counted_start, counted_resume, counted_execute


@pytest.mark.parametrize(("seed", "num_blocks", "kind"), [(25, 10, "admit"), (38, 12, "resume")])
def test_the_prefill_counts_are_what_the_worker_computed_when_it_lacked_a_prefix(loaded, seed, num_blocks, kind):
    """Conversations on a small cache where jobs stop early (stop tokens), so the worker
    releases them before the mirror does and lacks, at an admit or at the resume of a dropped
    job, blocks the plan counted cached. The core's counts of tokens computed and of tokens
    read from the cache are the worker's own; before the reports carried the stand-ins, the
    core counted them cached and the computed tokens fell short by as many."""
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=16)
    worker = make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len, prefix_caching=True)
    truth = WorkerPrefill(worker)
    refused, core, _ = converse(seed, num_blocks, 150, worker=worker, sampling=stops_early)
    assert refused == [] and not core.jobs
    stand_ins = {"admit": worker.kv.num_admit_missing_tokens, "resume": worker.kv.num_resume_missing_tokens}
    assert stand_ins[kind] > 0  # the run did meet the mismatch
    counts = core.prefill
    assert counts.num_computed_tokens == truth.num_computed_tokens
    assert counts.num_cached_tokens == truth.num_cached_tokens
    assert counts.num_resume_cached_tokens == truth.num_resume_cached_tokens
    assert counts.hit_rate == truth.num_cached_tokens / counts.num_admitted_tokens


@pytest.mark.parametrize(("seed", "num_blocks"), [(21, 10), (22, 10), (24, 12)])
def test_a_prefill_dropped_before_it_ends_counts_only_what_ran(loaded, seed, num_blocks):
    """The same conversations, where a job is dropped while its prompt is still fed in chunks:
    the core counted its whole prefill computed when it planned it and counts it again when the
    job resumes, so what the drop left uncomputed is given back (before: the core counted 18,
    27 and 14 tokens more than these runs' workers computed)."""
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=16)
    worker = make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len, prefix_caching=True)
    truth = WorkerPrefill(worker)
    refused, core, _ = converse(seed, num_blocks, 150, worker=worker, sampling=stops_early)
    assert refused == [] and not core.jobs and core.preemptions["drop"] > 0
    assert core.prefill.num_computed_tokens == truth.num_computed_tokens


def test_the_stand_in_counts_cross_the_wire():
    report = StepReport(step_id=7, outputs=[JobOutput("a", [5], None, 40)], refused=[Refusal("b", "admit", "x")],
                        num_admit_stand_in_tokens=32, num_resume_stand_in_tokens=16)
    pb = wire.report_to_pb(report).report
    assert (pb.num_admit_stand_in_tokens, pb.num_resume_stand_in_tokens) == (32, 16)
    assert wire.report_from_pb(pb) == report
    pb.num_resume_stand_in_tokens = -16
    with pytest.raises(wire.WireError, match="stand-in tokens cannot be negative"):
        wire.report_from_pb(pb)


def test_a_report_of_more_stand_ins_than_the_plan_counted_cached_is_refused():
    """A plan admitting with 32 cached tokens and resuming with 16: a correct worker reports at
    most that many computed in their place."""
    sampling = SamplingParams(max_tokens=4)
    commands = [Admit("a", list(range(40)), sampling, num_cached_tokens=32), Resume("b", num_cached_tokens=16),
                Resume("c")]
    flight = InFlight.of(3, set(), commands, census=False, planned_free_blocks=0)
    assert (flight.num_admit_cached_tokens, flight.num_resume_cached_tokens) == (32, 16)
    jobs = {"a": Job("a", list(range(40)), sampling, arrival_s=0.0)}
    check_report(StepReport(3, num_admit_stand_in_tokens=32, num_resume_stand_in_tokens=16), deque([flight]), jobs)
    with pytest.raises(ReportError, match="48 tokens of its admits computed in place of cached ones, which the "
                                          "plan counted 32 of"):
        check_report(StepReport(3, num_admit_stand_in_tokens=48), deque([flight]), jobs)
    with pytest.raises(ReportError, match="17 tokens of its resumes"):
        check_report(StepReport(3, num_resume_stand_in_tokens=17), deque([flight]), jobs)
