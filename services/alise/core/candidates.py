"""Incremental state behind the core's fast scheduling path (``SchedulerCore._schedule_fast``).

Two structures, both updated by the core at the moments a job changes (arrival, admit,
pause, KV move, resume, finish, refusal, lost worker), never rebuilt per step:

* ``TieLabels``  an integer label per job, increasing in (arrival, job id): the order the
                 reference ``_order`` breaks key ties with, as one number that numpy can sort.
* ``JobColumns`` every unfinished job as numpy columns. An idle job's values (waiting or
                 paused) cannot change while it is idle (its tokens, KV place, queue time and
                 estimate stay put), so a step reads them with a few array operations instead
                 of a Python loop over ~1,000 jobs; its remaining time is computed once per
                 idle spell, lazily, by the step that first needs it. A running job's only
                 moving part is its output length, read each step.
"""

from __future__ import annotations

import bisect

import numpy as np

from alise.core.job import Job, KvPlace, LengthEstimate

#: Gap between consecutive tie labels when (re)labelling; an arrival in between takes the
#: midpoint, so 2 ** 32 leaves room for 32 arrivals in a row at one place before a relabel.
_SPACING = 1 << 32
_LIMIT = 1 << 62


class TieLabels:
    """``label[job_id]`` increasing in ``(arrival_s, job_id)`` over the jobs it holds."""

    def __init__(self) -> None:
        self._keys: list[tuple[float, str]] = []
        self._labels: list[int] = []
        self.label: dict[str, int] = {}
        #: Number of relabellings so far (consumers holding copies refresh on a change).
        self.epoch = 0

    def add(self, job: Job) -> int:
        key = (job.arrival_s, job.job_id)
        keys, labels = self._keys, self._labels
        pos = bisect.bisect_left(keys, key)
        lo = labels[pos - 1] if pos else 0
        if pos == len(keys):
            value = lo + _SPACING
        else:
            value = (lo + labels[pos]) // 2
        if value <= lo or value >= _LIMIT or (pos < len(keys) and value >= labels[pos]):
            keys.insert(pos, key)
            labels.insert(pos, 0)
            self._relabel()
            return self.label[job.job_id]
        keys.insert(pos, key)
        labels.insert(pos, value)
        self.label[job.job_id] = value
        return value

    def remove(self, job: Job) -> None:
        if self.label.pop(job.job_id, None) is None:
            return
        key = (job.arrival_s, job.job_id)
        pos = bisect.bisect_left(self._keys, key)
        if pos == len(self._keys) or self._keys[pos][1] != job.job_id:
            pos = next(i for i, k in enumerate(self._keys) if k[1] == job.job_id)
        del self._keys[pos]
        del self._labels[pos]

    def _relabel(self) -> None:
        self._labels = [(i + 1) * _SPACING for i in range(len(self._keys))]
        self.label = {job_id: value for (_, job_id), value in zip(self._keys, self._labels)}
        self.epoch += 1


class JobColumns:
    """Numpy columns of the core's unfinished jobs, one slot each (slots are reused).

    Owner -1: the waiting queue; owner w: on the worker of index w, running or paused.
    Every value is read from the job when the core puts it (on each change it makes to the
    job); a running job's token count is refreshed by each step of its worker, and ``rb``
    (the remaining time before the latency correction) and ``reserve`` of an idle job are filled
    lazily, once per idle spell (``dirty``).
    """

    _COLUMNS = {
        "rb": np.float64,           # remaining time before correction (idle; lazily)
        "reserve": np.float64,      # the policy's growth reserve in tokens (idle: lazily, with rb)
        "dirty": bool,              # rb not computed since the last put
        "queued": np.float64,       # job.queued_s
        "idle_since": np.float64,   # job.idle_since_s
        "tie": np.int64,            # TieLabels label
        "ntok": np.int64,           # job.num_tokens at the put
        "plen": np.int64,           # job.num_prompt_tokens
        "kv_none": bool,            # job.kv is KvPlace.NONE
        "host_blocks": np.int64,    # held_host_blocks(job) on its worker
        "mean": np.float64,         # the policy's estimate of the job (running jobs)
        "p90": np.float64,
        "max_tokens": np.int64,
        "owner": np.int64,          # -2 free slot, -1 waiting, w >= 0 on worker w
        "running": bool,            # job.status is RUNNING
    }

    def __init__(self, capacity: int = 256) -> None:
        self.jobs = np.full(capacity, None, dtype=object)
        self.ids = np.full(capacity, None, dtype=object)
        self.slot_of: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        for name, dtype in self._COLUMNS.items():
            setattr(self, name, np.zeros(capacity, dtype=dtype))
        self.owner[:] = -2

    def __len__(self) -> int:
        return len(self.slot_of)

    def put(self, job: Job, owner: int, tie: int, host_blocks: int = 0,
            estimate: LengthEstimate | None = None, running: bool = False) -> None:
        slot = self.slot_of.get(job.job_id)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self.slot_of[job.job_id] = slot
        self.jobs[slot] = job
        self.ids[slot] = job.job_id
        self.queued[slot] = job.queued_s
        self.idle_since[slot] = job.idle_since_s
        self.tie[slot] = tie
        plen = len(job.prompt_token_ids)
        self.plen[slot] = plen
        self.ntok[slot] = plen + len(job.output_token_ids)
        self.kv_none[slot] = job.kv is KvPlace.NONE
        self.host_blocks[slot] = host_blocks
        if estimate is not None:
            self.mean[slot] = estimate.mean
            self.p90[slot] = estimate.p90
        self.max_tokens[slot] = job.sampling.max_tokens
        self.owner[slot] = owner
        self.running[slot] = running
        self.dirty[slot] = True

    def discard(self, job_id: str) -> None:
        slot = self.slot_of.pop(job_id, None)
        if slot is None:
            return
        self.jobs[slot] = None
        self.ids[slot] = None
        self.owner[slot] = -2
        self._free.append(slot)

    def retie(self, labels: dict[str, int]) -> None:
        for job_id, slot in self.slot_of.items():
            self.tie[slot] = labels[job_id]

    def _grow(self) -> None:
        old = len(self.jobs)
        new = 2 * old
        for name in ("jobs", "ids", *self._COLUMNS):
            col = getattr(self, name)
            grown = np.zeros(new, dtype=col.dtype) if col.dtype != object \
                else np.full(new, None, dtype=object)
            grown[:old] = col
            if name == "owner":
                grown[old:] = -2
            setattr(self, name, grown)
        self._free.extend(range(new - 1, old - 1, -1))
