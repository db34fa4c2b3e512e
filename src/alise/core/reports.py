"""A worker's step report, checked whole before anything of it is applied.

A report answers the oldest plan still in flight on its worker. :func:`check_report` reads
it against what that plan expects and raises :class:`ReportError` on anything a correct
worker cannot send; only a report that passes is applied, so a bad report never leaves a
gap or a repeat in a stream: the stream's tokens are appended only from checked reports,
and the engine then disconnects the worker, whose jobs go back to the queue with the tokens
confirmed so far.

What a plan expects (``InFlight.outputs``): exactly one token from every job whose feed in
that step reaches the end of its sequence and that is still on the worker. Jobs that left
the worker since (cancelled, finished in an earlier step, refused and re-queued) are struck
from every plan in flight when they leave, and an output naming a job the core no longer
has is ignored (its stream is gone). Nor is one of a job that left the worker and was
admitted there again after that step (:func:`job_at`): it belongs to the job's earlier stay,
which the worker has since released, and the job recomputes from its confirmed tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from alise.core.commands import Admit, Command, Resume, StepReport
from alise.core.job import Job


class ReportError(ValueError):
    """A report no correct worker could send (the engine disconnects the worker)."""


@dataclass
class InFlight:
    """A plan sent to a worker whose report has not come back."""

    step_id: int
    #: Jobs that will produce a token in that step.
    outputs: set[str] = field(default_factory=set)
    #: The plan asked for a census; the device blocks it left free on the worker (at most
    #: what the worker reports: jobs can only have left since).
    census: bool = False
    planned_free_blocks: int = 0
    #: Tokens the plan's admits, and its resumes, counted cached: the most the worker can
    #: report computed in their place (stand-ins, ``StepReport.num_admit_stand_in_tokens``).
    num_admit_cached_tokens: int = 0
    num_resume_cached_tokens: int = 0

    @classmethod
    def of(cls, step_id: int, outputs: set[str], commands: list[Command], *, census: bool,
           planned_free_blocks: int) -> InFlight:
        """A plan with ``commands`` sent."""
        admit = resume = 0
        for c in commands:
            if isinstance(c, Admit):
                admit += c.num_cached_tokens
            elif isinstance(c, Resume):
                resume += c.num_cached_tokens
        return cls(step_id, outputs, census=census, planned_free_blocks=planned_free_blocks,
                   num_admit_cached_tokens=admit, num_resume_cached_tokens=resume)


def check_report(report: StepReport, in_flight: deque[InFlight], jobs: dict[str, Job]) -> None:
    """Raises :class:`ReportError` unless ``report`` is a correct answer to ``in_flight[0]``
    given the worker's jobs ``jobs`` (the core's view); changes nothing."""
    if not in_flight:
        raise ReportError(f"reported step {report.step_id}, but no plan is in flight")
    expected = in_flight[0]
    if report.step_id != expected.step_id:
        raise ReportError(f"reported step {report.step_id}, expected {expected.step_id}")
    refused = {r.job_id for r in report.refused}
    seen: set[str] = set()
    for out in report.outputs:
        job = job_at(jobs, out.job_id, report.step_id)
        if job is None or out.job_id in refused:
            continue  # it left this worker while the step ran; nothing streams from it
        if out.job_id in seen:
            raise ReportError(f"job {out.job_id} reported twice in step {report.step_id}")
        seen.add(out.job_id)
        if out.job_id not in expected.outputs:
            raise ReportError(f"job {out.job_id} produced a token in step {report.step_id}, "
                              "which did not feed it to the end of its sequence")
        if len(out.token_ids) != 1:
            raise ReportError(f"job {out.job_id}: {len(out.token_ids)} tokens in one step")
        if out.finish_reason is None and job.num_output_tokens + 1 >= job.sampling.max_tokens:
            raise ReportError(f"job {out.job_id} reached max_tokens without finishing")
        held = job.num_prompt_tokens + job.num_output_tokens + 1
        if out.num_tokens != held:
            raise ReportError(f"job {out.job_id} holds {out.num_tokens} tokens, the scheduler "
                              f"counts {held}")
    missing = sorted(j for j in expected.outputs if j in jobs and j not in seen and j not in refused)
    if missing:
        raise ReportError(f"step {report.step_id} should have produced a token for "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for kind, stand_ins, cached in (("admits", report.num_admit_stand_in_tokens, expected.num_admit_cached_tokens),
                                    ("resumes", report.num_resume_stand_in_tokens, expected.num_resume_cached_tokens)):
        if not 0 <= stand_ins <= cached:
            raise ReportError(f"step {report.step_id}: {stand_ins} tokens of its {kind} computed in place of "
                              f"cached ones, which the plan counted {cached} of")


def job_at(jobs: dict[str, Job], job_id: str, step_id: int) -> Job | None:
    """The worker's job ``job_id`` as step ``step_id`` knew it: None when the job has left the
    worker, or left it and was admitted there again by a later plan (its ``admit_step_id``).
    What a report of that step says of the job (a token, a refusal) is of a stay that is over."""
    job = jobs.get(job_id)
    return job if job is not None and job.admit_step_id <= step_id else None


def strike(in_flight: deque[InFlight], job_id: str) -> None:
    """``job_id`` left the worker: no plan in flight expects a token from it any more."""
    for plan in in_flight:
        plan.outputs.discard(job_id)
