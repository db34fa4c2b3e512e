"""Does a worker hold exactly the jobs the scheduler thinks it holds?

Every so often a plan asks the worker for a census: its report then lists every job the
worker holds after that step. The scheduler knows what that list must be, step for step,
because every change to a worker's jobs is ordered on the one stream between them:

* a job is on the worker from the step of the plan that admitted it (``Job.admit_step_id``)
  until a report says it finished or was refused, or until an abort takes it off;
* an abort goes out after plan ``through`` (the last plan sent before it) and takes effect
  at the worker's next step boundary, so by step ``through + 1`` the job is gone; an admit
  of the job in a plan up to ``through`` that the worker had not run yet is skipped. Until
  then the job may or may not be there: it is *uncertain* for steps up to ``through``.

A census then finds two kinds of disagreement, each a bug somewhere, and each is repaired
where it is found: a *ghost* (the worker holds a job the scheduler does not know, and no
abort of it is on its way) is aborted on sight; a *missing* job (the scheduler counts on a
job the worker no longer holds) goes back to the queue and recomputes. A census also
compares device blocks: the worker never has fewer free than the plan of that step left
free (jobs only leave the worker early, never late), so fewer free is a *block deficit*.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from alise.core.job import Job


@dataclass
class CensusFindings:
    """What one census found (empty lists: the worker and the scheduler agree)."""

    step_id: int
    ghosts: list[str] = field(default_factory=list)
    missing: list[Job] = field(default_factory=list)
    #: Device blocks the worker has in use beyond what the plan of that step allowed (0: none).
    block_deficit: int = 0

    @property
    def agrees(self) -> bool:
        return not self.ghosts and not self.missing and not self.block_deficit


@dataclass
class Disagreements:
    """Running totals of one worker's censuses (since it connected)."""

    num_censuses: int = 0
    num_ghosts: int = 0
    num_missing: int = 0
    num_block_deficits: int = 0

    def add(self, findings: CensusFindings) -> None:
        self.num_censuses += 1
        self.num_ghosts += len(findings.ghosts)
        self.num_missing += len(findings.missing)
        self.num_block_deficits += findings.block_deficit > 0


def check_census(step_id: int, held_ids: Iterable[str], jobs: Mapping[str, Job],
                 aborting: Mapping[str, int], pending_aborts: Iterable[str], *,
                 planned_free_blocks: int, reported_free_blocks: int) -> CensusFindings:
    """Compares a census taken after step ``step_id`` (``held_ids``) with the scheduler's
    view: ``jobs`` on that worker, ``aborting`` (job id -> the last plan sent before its
    abort), ``pending_aborts`` (aborts not sent yet)."""
    held = set(held_ids)
    uncertain = {job_id for job_id, through in aborting.items() if through >= step_id}
    uncertain.update(pending_aborts)
    ghosts = sorted(j for j in held if j not in jobs and j not in uncertain)
    missing = [job for job_id, job in jobs.items() if job.admit_step_id <= step_id and job_id not in held]
    return CensusFindings(step_id, ghosts, missing, max(planned_free_blocks - reported_free_blocks, 0))
