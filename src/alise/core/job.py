"""A job: one generation request as the scheduler core sees it.

Token arithmetic used throughout the core (and mirrored exactly by the worker):

* The core plans ahead of the worker: a step is planned before the reports of the steps
  before it have come back. So a job has *confirmed* output tokens (reported, streamed) and
  *pending* ones (``num_pending_outputs``: planned steps will produce them; their values are
  not known yet, only their count). Planning reads the projected counts: ``num_generated`` =
  confirmed + pending, ``num_tokens`` = prompt + ``num_generated``.
* ``num_computed_tokens``: positions whose K/V the worker will hold once every planned step
  has run. A step feeds a job the next ``n`` uncomputed tokens (``n = 1`` for a decode; a
  prompt or a recompute is fed in chunks under the step's token budget); the step that feeds
  its last uncomputed token samples one new token, which is not yet in the cache, so a
  decoding job computes ``num_tokens - 1`` positions.
* To take part in a step a job needs ``blocks_for(num_tokens)`` device blocks (the whole
  sequence, whatever its chunk: a job that starts is sure to finish its prefill).

The two counts a plan projects (``num_pending_outputs``, ``num_computed_tokens``) live in the
core's job table while the job is in it (:class:`ProjectedCount`): a plan projects a step onto
its jobs with a few numpy writes, and the job reads the same numbers as its own. There the
pending outputs are kept as the projected ``num_tokens``, so a report's confirmed token (one
more in ``output_token_ids``) is one pending token fewer without a write.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field, replace
from itertools import compress, product
from typing import Any, Protocol

from alise.core.sampling import SamplingParams


class JobStatus(enum.Enum):
    WAITING = "waiting"      # not on any worker (never started, or handed back)
    RUNNING = "running"      # in the worker's active batch
    PAUSED = "paused"        # on a worker, not stepping
    FINISHED = "finished"

    # Members are singletons, equal only to themselves: hashing by identity is the same
    # contract, in C (Enum's own hashes the name in Python, and every plan looks statuses up).
    __hash__ = object.__hash__


#: The status changes a job may make; ``Job.transition`` refuses any other. PAUSED -> PAUSED
#: is a paused job's KV moving (the planner's commands); a job enters PAUSED without a
#: change only when it is adopted from a worker's hello (built paused, not moved there).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.WAITING: frozenset({JobStatus.RUNNING, JobStatus.FINISHED}),
    JobStatus.RUNNING: frozenset({JobStatus.PAUSED, JobStatus.WAITING, JobStatus.FINISHED}),
    JobStatus.PAUSED: frozenset({JobStatus.PAUSED, JobStatus.RUNNING, JobStatus.WAITING, JobStatus.FINISHED}),
    JobStatus.FINISHED: frozenset(),
}
#: Statuses in which a job waits (its time counts as queued).
IDLE = frozenset({JobStatus.WAITING, JobStatus.PAUSED})
#: ``Job.transition``'s keywords, and those each change needs (an admit: WAITING -> RUNNING).
_KEYWORDS = ("kv", "worker_id", "admit_step_id", "reason")
_NEEDS = {JobStatus.PAUSED: frozenset({"kv"}), JobStatus.FINISHED: frozenset({"reason"})}
_ADMIT_NEEDS = frozenset({"worker_id", "admit_step_id"})
#: The keywords given, by which of them are (prebuilt: every status change asks).
_GIVEN = {flags: frozenset(compress(_KEYWORDS, flags)) for flags in product((False, True), repeat=len(_KEYWORDS))}


class TransitionError(ValueError):
    """A status change that ``TRANSITIONS`` does not allow, or without what it needs."""


class KvPlace(enum.Enum):
    """Where a job's KV cache lives."""

    NONE = "none"            # nothing cached: the next step recomputes the whole sequence
    DEVICE = "device"
    DEVICE_INT8 = "int8"
    DEVICE_INT4 = "int4"
    HOST = "host"
    HOST_INT8 = "host-int8"  # quantized on the device, then swapped to host memory
    HOST_INT4 = "host-int4"

    __hash__ = object.__hash__  # as JobStatus's


#: Members read on every status change (a module global is read faster than an enum's member).
_WAITING, _RUNNING, _PAUSED = JobStatus.WAITING, JobStatus.RUNNING, JobStatus.PAUSED
_NO_KV, _DEVICE = KvPlace.NONE, KvPlace.DEVICE
_NOTHING: frozenset[str] = frozenset()
#: The keywords each allowed change (from, to) needs (prebuilt: every status change asks).
_CHANGES = {(a, b): _ADMIT_NEEDS if (a, b) == (JobStatus.WAITING, JobStatus.RUNNING) else _NEEDS.get(b, _NOTHING)
            for a, allowed in TRANSITIONS.items() for b in allowed}


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORTED = "aborted"


class TableRow(Protocol):
    """Where a job's projected counts live while a job table holds it (``JobTable.put``): the
    table's integer columns, at the job's slot."""

    num_tokens: Any
    num_computed_tokens: Any


class ProjectedCount:
    """A job's projected token count (a dataclass field): the job's own value while no table
    holds it, else read from and written to its table row (``Job.row``). This class is
    ``num_computed_tokens``, in the table's column of that name; :class:`PendingOutputs` the
    pending outputs.

    NOTE: a job is in at most one table; ``JobTable.discard`` hands the values back to the
    job when it leaves, so a job outside any table keeps them."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.own = "_own_" + name

    def __get__(self, job: Job | None, owner: type | None = None) -> int:
        if job is None:
            return 0  # the field's default
        # NOTE: plain attribute reads and writes, never ``job.__dict__``: CPython keeps a job's
        # attributes inline (fast to read everywhere) until its ``__dict__`` is asked for.
        row = job.row
        if row is None:
            return getattr(job, self.own)
        table, slot = row
        return self.load(job, table, slot)

    def __set__(self, job: Job, value: int) -> None:
        row = job.row
        if row is None:
            setattr(job, self.own, value)
        else:
            table, slot = row
            self.store(job, table, slot, value)

    def load(self, job: Job, table: TableRow, slot: int) -> int:
        return table.num_computed_tokens.item(slot)

    def store(self, job: Job, table: TableRow, slot: int, value: int) -> None:
        table.num_computed_tokens[slot] = value


class PendingOutputs(ProjectedCount):
    """``num_pending_outputs``, kept in a table row as the job's projected ``num_tokens``
    (prompt + confirmed + pending): a confirmed output (appended to ``output_token_ids``)
    is one pending output fewer, with no write."""

    def load(self, job: Job, table: TableRow, slot: int) -> int:
        return table.num_tokens.item(slot) - len(job.prompt_token_ids) - len(job.output_token_ids)

    def store(self, job: Job, table: TableRow, slot: int, value: int) -> None:
        table.num_tokens[slot] = len(job.prompt_token_ids) + len(job.output_token_ids) + value


@dataclass(frozen=True)
class LengthEstimate:
    """Predicted output length in tokens: a point estimate and upper quantiles."""

    mean: float
    p50: float
    p90: float
    source: str = "prior"

    def __post_init__(self) -> None:
        if not (self.mean >= 0 and self.p50 >= 0 and self.p90 >= 0):
            raise ValueError(f"length estimate must be non-negative, got {self}")


@dataclass
class Job:
    job_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_s: float
    estimate: LengthEstimate | None = None
    #: True output length when known in advance (trace replay): the job ends there, as if
    #: the model had stopped (``worker_sampling``); only the oracle policy schedules by it.
    oracle_output_tokens: int | None = None
    #: The prompt as text (fed back to the length predictor when the job finishes).
    prompt_text: str = ""

    #: Confirmed output tokens (reported by the worker, streamed to the client).
    output_token_ids: list[int] = field(default_factory=list)
    #: (the job table holding the job, its slot); None: in none (``ProjectedCount``). Set
    #: before the counts below (field order), which read it.
    row: tuple[TableRow, int] | None = field(default=None, init=False, repr=False, compare=False)
    #: Output tokens that steps already planned will produce but whose reports are not in.
    num_pending_outputs: PendingOutputs = PendingOutputs()
    #: Positions whose K/V the worker holds once every planned step has run (0: none).
    num_computed_tokens: ProjectedCount = ProjectedCount()
    #: Of them, the leading ones read from blocks of the worker's prefix cache, shared and
    #: counted once per worker (``alise.core.prefix_mirror``); whole blocks, set by the admit.
    num_shared_tokens: int = 0
    status: JobStatus = JobStatus.WAITING
    kv: KvPlace = KvPlace.NONE
    worker_id: str | None = None
    num_preemptions: int = 0
    #: Time the job last entered WAITING or PAUSED (for aging and queue-time accounting).
    idle_since_s: float = 0.0
    queued_s: float = 0.0
    #: When the job first went RUNNING (vLLM's first SCHEDULED): its wait and prefill meet there.
    scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: FinishReason | None = None
    #: Step id of the plan that admitted the job to its worker (0: adopted from the worker's
    #: hello); from that step on the worker holds it (``alise.core.census``).
    admit_step_id: int = 0
    #: Where the prefill of the job's current stay on its worker ends (its tokens when it was
    #: admitted, or resumed after a drop): the core counts the prefill computed when it plans
    #: it, and gives back what a drop leaves uncomputed (``StepPlanner._apply_move``).
    prefill_end: int = 0
    #: The sampling parameters a worker runs the job with: the request's, except that a job of
    #: known length (``oracle_output_tokens``, trace replay) ends at that length. Made once,
    #: with the job (neither of the two changes), not on each admit of a plan.
    #:
    #: The policies see only ``sampling.max_tokens``, the request's own cap: a benchmark that
    #: replays a trace must not tell the scheduler each job's true length through it (the
    #: remaining-time estimate is capped at ``max_tokens - done``).
    worker_sampling: SamplingParams = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"job {self.job_id}: empty prompt")
        self.idle_since_s = self.arrival_s
        n = self.oracle_output_tokens
        capped = n is not None and n < self.sampling.max_tokens
        self.worker_sampling = _capped(self.sampling, n) if capped else self.sampling

    def __getstate__(self) -> dict[str, Any]:
        """A copy (pickled, deep-copied) holds its projected counts itself, in no table."""
        state = dict(self.__dict__)
        if state.get("row") is not None:
            for count in _PROJECTED:
                state[count.own] = count.__get__(self)
            state["row"] = None
        return state

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Confirmed output tokens."""
        return len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        """Output tokens once every planned step has run (confirmed + pending)."""
        return len(self.output_token_ids) + self.num_pending_outputs

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens once every planned step has run."""
        row = self.row
        if row is not None:  # the count the table keeps (``PendingOutputs``)
            table, slot = row
            return table.num_tokens.item(slot)
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_outputs

    @property
    def num_private_tokens(self) -> int:
        """Computed positions in the job's own blocks (what a KV move moves)."""
        return self.num_computed_tokens - self.num_shared_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is JobStatus.FINISHED

    @property
    def is_dropped(self) -> bool:
        """Paused with its KV nowhere: its resume computes it again, less the prefix its
        worker's cache still holds."""
        return self.status is _PAUSED and self.kv is _NO_KV

    def all_token_ids(self) -> list[int]:
        """Prompt and confirmed output tokens (what a worker that admits the job receives)."""
        return self.prompt_token_ids + self.output_token_ids

    # ----------------------------------------------------------------- status

    def _refuse(self, status: JobStatus, given: frozenset[str]) -> None:
        """Raises the :class:`TransitionError` of a change to ``status`` with the keywords
        ``given`` that ``_CHANGES`` does not allow."""
        current, allowed = self.status, TRANSITIONS[self.status]
        if status not in allowed:
            names = ", ".join(sorted(x.value for x in allowed)) or "nothing"
            raise TransitionError(f"job {self.job_id}: cannot go from {current.value} to "
                                  f"{status.value} (from {current.value}: {names})")
        needs = _CHANGES[current, status]
        takes, got = ", ".join(sorted(needs)) or "nothing", ", ".join(sorted(given)) or "nothing"
        raise TransitionError(f"job {self.job_id}: {current.value} -> {status.value} takes {takes}, got {got}")

    def transition(self, status: JobStatus, now_s: float, *, kv: KvPlace | None = None,
                   worker_id: str | None = None, admit_step_id: int | None = None,
                   reason: FinishReason | None = None) -> None:
        """Moves the job to ``status`` and sets every field that status implies:

        ============  ===================================================================
        WAITING       on no worker, nothing cached or pending: ``kv`` NONE, ``worker_id``
                      None, no computed or pending tokens
        RUNNING       ``kv`` DEVICE (a resume brings the KV back at full precision); from
                      WAITING the job is admitted: ``worker_id`` and ``admit_step_id`` given;
                      the first time, ``scheduled_s`` now
        PAUSED        ``kv`` given (where the planner put it; NONE: nothing computed);
                      from RUNNING it is a preemption (``num_preemptions`` + 1)
        FINISHED      ``reason`` given, ``finish_s`` now, ``kv`` NONE, nothing pending
        ============  ===================================================================

        Time spent in WAITING or PAUSED is added to ``queued_s`` when the job leaves them
        (``idle_since_s`` marks the start of the spell). Raises :class:`TransitionError`
        (and changes nothing) on a change ``TRANSITIONS`` does not allow, or when a keyword
        the new status needs is missing or one it does not take is given.
        """
        current = self.status
        given = _GIVEN[kv is not None, worker_id is not None, admit_step_id is not None, reason is not None]
        if given != _CHANGES.get((current, status)):  # (one look-up: allowed, with what it needs)
            self._refuse(status, given)
        if status is not current:
            if current in IDLE:
                self.queued_s += max(now_s - self.idle_since_s, 0.0)
            if status in IDLE:
                self.idle_since_s = now_s
        if status is _WAITING:
            self.kv, self.worker_id = _NO_KV, None
            self.num_computed_tokens = self.num_shared_tokens = self.num_pending_outputs = 0
        elif status is _RUNNING:
            self.kv = _DEVICE
            if self.scheduled_s is None:
                self.scheduled_s = now_s
            if current is _WAITING:  # an admit
                assert admit_step_id is not None  # given: checked above
                self.worker_id, self.admit_step_id = worker_id, admit_step_id
        elif status is _PAUSED:
            if current is _RUNNING:
                self.num_preemptions += 1
            assert kv is not None  # given: checked above
            self.kv = kv
            if kv is _NO_KV:
                self.num_computed_tokens = self.num_shared_tokens = 0
        else:
            self.finish_reason, self.finish_s = reason, now_s
            self.kv, self.num_pending_outputs = _NO_KV, 0
        self.status = status


#: The fields a job table holds while it holds the job.
_PROJECTED = (Job.__dict__["num_pending_outputs"], Job.__dict__["num_computed_tokens"])


@functools.lru_cache(maxsize=1024)
def _capped(sampling: SamplingParams, max_tokens: int) -> SamplingParams:
    """``sampling`` ending at ``max_tokens`` (frozen, so shared: every admit of a job of known
    length asks, and ``replace`` checks every field again). ``min_tokens`` is capped with it:
    no more may be asked than the job runs."""
    return replace(sampling, max_tokens=max_tokens, min_tokens=min(sampling.min_tokens, max_tokens))
