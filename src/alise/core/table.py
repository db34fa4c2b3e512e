"""Every unfinished job as numpy columns: what a scheduling step reads instead of Python loops.

Two structures, both updated by the core at the moments a job changes (arrival, admit,
pause, KV move, resume, finish, refusal, lost worker, new estimate), never rebuilt per step:

* :class:`TieLabels`  an integer label per job, increasing in (arrival, job id): the order
                      ties between equal keys are broken in, as one number numpy can sort.
* :class:`JobTable`   one slot per unfinished job, and the slots in tie order
                      (``tie_order``: ranking sorts candidates taken in that order by their
                      keys alone, with a stable sort). An idle job's values (waiting or paused)
                      cannot change while it is idle (its tokens, KV, queue time and estimate
                      stay put), so its remaining time is computed once per idle spell, lazily,
                      by the first step that ranks it. A running job's moving parts (its
                      projected tokens) are written by each plan that feeds it.

A job in the table reads its projected counts from its row (``alise.core.job.ProjectedCount``):
``num_computed_tokens``, and its pending outputs as ``num_tokens`` (prompt + confirmed +
pending). The table holds them from the job's first ``put`` to its ``discard``, which hands
them back to the job.
"""

from __future__ import annotations

import bisect

import numpy as np

from alise.core.job import Job, JobStatus
from alise.core.policy import Candidates, RemainingTimeEstimator

#: Gap between consecutive tie labels when (re)labelling; an arrival in between takes the
#: midpoint, so 2 ** 32 leaves room for 32 arrivals in a row at one place before a relabel.
_SPACING = 1 << 32
_LIMIT = 1 << 62

_RUNNING = JobStatus.RUNNING
_INF = float("inf")

#: Owner values: a free slot, the waiting queue; >= 0 is a worker's index.
FREE = -2
WAITING = -1


class TieLabels:
    """``label[job_id]`` increasing in ``(arrival_s, job_id)`` over the jobs it holds."""

    def __init__(self) -> None:
        self._keys: list[tuple[float, str]] = []
        self._labels: list[int] = []
        self.label: dict[str, int] = {}
        #: Number of relabellings so far (holders of copies refresh on a change).
        self.epoch = 0

    def add(self, job: Job) -> tuple[int, int]:
        """(the job's label, its position among the jobs held, in label order)."""
        key = (job.arrival_s, job.job_id)
        keys, labels = self._keys, self._labels
        pos = bisect.bisect_left(keys, key)
        lo = labels[pos - 1] if pos else 0
        value = lo + _SPACING if pos == len(keys) else (lo + labels[pos]) // 2
        keys.insert(pos, key)
        if value <= lo or value >= _LIMIT or (pos + 1 < len(keys) and value >= labels[pos]):
            labels.insert(pos, 0)
            self._relabel()
            return self.label[job.job_id], pos
        labels.insert(pos, value)
        self.label[job.job_id] = value
        return value, pos

    def remove(self, job: Job) -> int | None:
        """The job's position before it left (None: not held)."""
        if self.label.pop(job.job_id, None) is None:
            return None
        pos = bisect.bisect_left(self._keys, (job.arrival_s, job.job_id))
        del self._keys[pos]
        del self._labels[pos]
        return pos

    def _relabel(self) -> None:
        self._labels = [(i + 1) * _SPACING for i in range(len(self._keys))]
        self.label = {job_id: value for (_, job_id), value in zip(self._keys, self._labels, strict=True)}
        self.epoch += 1


class Column:
    """One numpy column of :class:`JobTable`, declared with its dtype. The table keeps the
    array in its instance, which shadows this declaration: a read is a plain attribute read,
    and a type checker sees an ``np.ndarray``."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, table: object, owner: type | None = None) -> np.ndarray:
        raise AttributeError(f"column {self.name} is read from a table, not its class")


class JobTable:
    """Numpy columns of the core's unfinished jobs, one slot each (slots are reused)."""

    owner = Column(np.int64)                # FREE, WAITING, or the index of the worker holding the job
    is_running = Column(bool)               # job.status is RUNNING
    tie_label = Column(np.int64)            # TieLabels label
    arrival_s = Column(np.float64)
    queued_s = Column(np.float64)
    idle_since_s = Column(np.float64)       # the job's, or +inf while it runs (it ages by nothing then)
    num_prompt_tokens = Column(np.int64)
    num_tokens = Column(np.int64)           # running jobs: projected by each plan (``_advance``)
    num_computed_tokens = Column(np.int64)  # likewise; both the job's own (``ProjectedCount``)
    num_shared_tokens = Column(np.int64)    # of them, read from shared prefix-cache blocks
    num_cached_hint = Column(np.int64)      # waiting or dropped jobs: tokens of their prefix cached on a worker
    max_tokens = Column(np.float64)         # (a float, as the remaining-time arithmetic it feeds)
    max_num_tokens = Column(np.int64)       # num_prompt_tokens + max_tokens: the job ends there
    estimate_mean = Column(np.float64)      # the policy's length estimate of the job, in tokens
    estimate_p90 = Column(np.float64)
    num_host_blocks = Column(np.int64)      # host blocks the job holds on its worker
    remaining_base_s = Column(np.float64)   # remaining time before the correction (idle: lazily)
    remaining_tokens = Column(np.float64)   # remaining output tokens (idle: lazily)
    is_stale = Column(bool)                 # the two above not computed since the last put
    route = Column(np.int64)                # worker index a waiting job is routed to (-1: none)

    def __init__(self, estimator: RemainingTimeEstimator, capacity: int = 256) -> None:
        self.estimator = estimator
        self.ties = TieLabels()
        self._epoch = 0
        self.jobs = np.full(capacity, None, dtype=object)
        #: ``jobs[slot].job_id`` (None where free).
        self.job_ids = np.full(capacity, None, dtype=object)
        self.slot_of: dict[str, int] = {}
        # The occupied slots in increasing tie label (``tie_order``), kept by every add and
        # discard: a relabelling keeps the order, so it never rebuilds this.
        self._by_tie = np.zeros(capacity, dtype=np.int64)
        self._free = list(range(capacity - 1, -1, -1))
        for name, column in _COLUMNS.items():
            setattr(self, name, np.zeros(capacity, dtype=column.dtype))
        self.owner[:] = FREE

    def __len__(self) -> int:
        return len(self.slot_of)

    def __setstate__(self, state: dict) -> None:
        """A copy of the table (pickled, deep-copied) holds copies of its jobs, which kept their
        counts themselves on the way (``Job.__getstate__``): they read this copy's rows again."""
        self.__dict__.update(state)
        for slot in self.slot_of.values():
            self.jobs[slot].row = (self, slot)

    # ----------------------------------------------------------------- changes

    def put(self, job: Job, owner: int, estimate, host_blocks: int = 0, cached_hint: int = 0) -> None:
        """Records ``job``'s current state (call on every change the core makes to it);
        ``cached_hint``: tokens of a waiting job's prefix a worker holds (its prefill is the
        rest, which its remaining time prices)."""
        slot = self.slot_of.get(job.job_id)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self.slot_of[job.job_id] = slot
            self.jobs[slot] = job
            self.job_ids[slot] = job.job_id
            self.route[slot] = -1
            self.tie_label[slot], pos = self.ties.add(job)
            if self.ties.epoch != self._epoch:
                self._retie()
            n, by_tie = len(self.slot_of) - 1, self._by_tie
            by_tie[pos + 1:n + 1] = by_tie[pos:n]  # numpy copies overlapping ranges as if buffered
            by_tie[pos] = slot
            # A job's arrival, prompt and request never change (its tie label relies on it too).
            self.arrival_s[slot] = job.arrival_s
            self.num_prompt_tokens[slot] = len(job.prompt_token_ids)
            self.max_tokens[slot] = job.sampling.max_tokens
            self.max_num_tokens[slot] = len(job.prompt_token_ids) + job.sampling.max_tokens
            self._attach(job, slot)
        running = job.status is _RUNNING
        self.owner[slot] = owner
        self.is_running[slot] = running
        self.queued_s[slot] = job.queued_s
        # NOTE: ``now - inf`` is -inf, which the aging rule's ``max(now - idle_since, 0)`` makes
        # 0: a running job ages by its closed spells (``queued_s``) alone, with no mask.
        self.idle_since_s[slot] = _INF if running else job.idle_since_s
        self.num_shared_tokens[slot] = job.num_shared_tokens
        self.num_cached_hint[slot] = cached_hint
        self.estimate_mean[slot] = estimate.mean
        self.estimate_p90[slot] = estimate.p90
        self.num_host_blocks[slot] = host_blocks
        self.is_stale[slot] = True

    def discard(self, job: Job) -> None:
        slot = self.slot_of.pop(job.job_id, None)
        if slot is None:
            return
        self._detach(job, slot)
        self.jobs[slot] = self.job_ids[slot] = None
        self.owner[slot] = FREE
        self._free.append(slot)
        pos = self.ties.remove(job)
        assert pos is not None  # every job of the table holds a label
        n, by_tie = len(self.slot_of), self._by_tie
        by_tie[pos:n] = by_tie[pos + 1:n + 1]

    def update_cached_hints(self, slots: np.ndarray, hints: np.ndarray) -> None:
        """Tokens of these idle jobs' prefixes cached on a worker now: their remaining times are
        recomputed where the count changed."""
        differs = self.num_cached_hint[slots] != hints
        changed = slots[differs]
        self.num_cached_hint[changed] = hints[differs]
        self.is_stale[changed] = True

    def mark_stale(self) -> None:
        """Every cached remaining time is stale (the latency model changed)."""
        self.is_stale[:] = True

    # ----------------------------------------------------------------- reads

    @property
    def tie_order(self) -> np.ndarray:
        """The occupied slots in increasing tie label, i.e. in (arrival, job id) order (a view:
        the next add or discard changes it)."""
        return self._by_tie[:len(self.slot_of)]

    def fill_remaining(self, slots: np.ndarray) -> None:
        """Computes ``remaining_base_s`` and ``remaining_tokens`` where they are stale, for the
        jobs at ``slots``."""
        todo = slots[self.is_stale[slots]]
        if not len(todo):
            return
        num_tokens = self.num_tokens[todo]
        # NOTE: the tokens generated as floats, as ``max_tokens`` and the estimates: the ufuncs of
        # the misprediction rule then never mix integers and floats (a mixed one converts each
        # integer as it goes, at twice the cost); counts far below 2 ** 53 convert exactly.
        done = (num_tokens - self.num_prompt_tokens[todo]).astype(np.float64)
        seconds, tokens = self.estimator.remaining_base_arrays(
            done, num_tokens,
            np.maximum(self.num_computed_tokens[todo], self.num_cached_hint[todo]),
            self.max_tokens[todo], self.estimate_mean[todo], self.estimate_p90[todo])
        self.remaining_base_s[todo] = seconds
        self.remaining_tokens[todo] = tokens
        self.is_stale[todo] = False

    def candidates(self, slots: np.ndarray) -> Candidates:
        """The policy's view of the jobs at ``slots`` (columns gathered as the policy reads them)."""
        return Candidates(self, slots)

    # ----------------------------------------------------------------- storage

    def _attach(self, job: Job, slot: int) -> None:
        """The job's projected counts move into its row (from wherever they are: the job, or
        another table that held it); ``num_tokens`` holds the pending outputs (``PendingOutputs``)."""
        self.num_tokens[slot], self.num_computed_tokens[slot] = job.num_tokens, job.num_computed_tokens
        job.row = (self, slot)

    def _detach(self, job: Job, slot: int) -> None:
        """The job's projected counts move back into the job (unless another table holds it now)."""
        if job.row != (self, slot):
            return
        job.row = None
        job.num_pending_outputs = int(self.num_tokens[slot]) - job.num_prompt_tokens - job.num_output_tokens
        job.num_computed_tokens = int(self.num_computed_tokens[slot])

    def _retie(self) -> None:
        labels = self.ties.label
        for job_id, slot in self.slot_of.items():
            self.tie_label[slot] = labels[job_id]
        self._epoch = self.ties.epoch

    def _grow(self) -> None:
        old = len(self.jobs)
        new = 2 * old
        for name in ("jobs", "job_ids", "_by_tie", *_COLUMNS):
            col = getattr(self, name)
            grown = np.full(new, None, dtype=object) if col.dtype == object else np.zeros(new, dtype=col.dtype)
            grown[:old] = col
            if name == "owner":
                grown[old:] = FREE
            setattr(self, name, grown)
        self._free.extend(range(new - 1, old - 1, -1))


#: The table's columns by name.
_COLUMNS = {name: c for name, c in vars(JobTable).items() if isinstance(c, Column)}
