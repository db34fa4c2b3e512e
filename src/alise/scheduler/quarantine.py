"""Requests that crashed the scheduler, remembered across its restarts.

When the scheduling loop raises, the engine names the jobs involved (``suspects``: the job
being handled where it raised, else those of the event or plan being handled) and the
service records them here before the process exits: one small JSON file in the scheduler's
state directory, replaced atomically (a temporary file, fsync, rename). After a restart
(``alise up`` restarts it) a request is refused, FAILED_PRECONDITION, once it was involved in
two crashes, or in one crash as the only job involved: the SDK resends every broken stream
to the restarted scheduler, so a request that crashes it would otherwise take the cluster
down again and again. Every other request is served as before.

A request is known by a key: its request id and a hash of its prompt's token ids and its
sampling parameters. The same request resent (a resumed stream) has the same key; another
request under the same id does not. The file keeps the most recent ``MAX_ENTRIES`` keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from alise.core.job import Job

logger = logging.getLogger(__name__)

FILE_NAME = "quarantine.json"
MAX_ENTRIES = 1000
#: Crashes a request may be involved in (with other jobs) before it is refused.
MAX_CRASHES = 2


def request_key(job: Job) -> str:
    """``<request id>:<16 hex digits>`` of the prompt's token ids and the sampling parameters."""
    sampling = json.dumps(dataclasses.asdict(job.sampling), sort_keys=True, default=str)
    digest = hashlib.sha256(json.dumps([job.prompt_token_ids, sampling]).encode()).hexdigest()[:16]
    return f"{job.job_id}:{digest}"


def suspects(exc: BaseException, involved: list[Job]) -> list[Job]:
    """The jobs to blame for ``exc``, caught by the loop that handles events: those held by
    the innermost frame below that loop's that holds any (the job being processed when it
    raised), else ``involved`` (those of the event or plan being handled)."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)][1:]
    for frame in reversed(frames):
        jobs = {id(v): v for v in frame.f_locals.values() if isinstance(v, Job)}
        if jobs:
            return list(jobs.values())
    return involved


@dataclass
class Entry:
    request_id: str
    crashes: int
    #: It was the only job involved in one of its crashes.
    alone: bool
    #: The last crash's exception, one line.
    error: str

    @property
    def is_refused(self) -> bool:
        return self.alone or self.crashes >= MAX_CRASHES


class Quarantine:
    """The recorded keys; ``state_dir`` None keeps them in memory only (this process)."""

    def __init__(self, state_dir: str | None) -> None:
        self.path = Path(state_dir) / FILE_NAME if state_dir else None
        self.entries: dict[str, Entry] = {}
        self._logged: set[str] = set()
        if self.path is not None and self.path.exists():
            try:
                self.entries = {k: Entry(**v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, TypeError) as exc:
                logger.error("quarantine file %s unreadable (%s); starting with none", self.path, exc)
        if any(e.is_refused for e in self.entries.values()):
            logger.warning("%d requests are quarantined (%s): they crashed the scheduler", sum(
                e.is_refused for e in self.entries.values()), self.path)

    def record_crash(self, jobs: list[Job], error: BaseException) -> None:
        """Counts a crash against each of ``jobs`` and writes the file (blocking: the process
        is about to exit)."""
        line = f"{type(error).__name__}: {error}"[:300]
        for job in jobs:
            key = request_key(job)
            entry = self.entries.pop(key, None) or Entry(job.job_id, 0, False, line)
            entry.crashes += 1
            entry.alone = entry.alone or len(jobs) == 1
            entry.error = line
            self.entries[key] = entry  # most recent last
        while len(self.entries) > MAX_ENTRIES:
            del self.entries[next(iter(self.entries))]
        logger.error("the crash involved %d requests: %s", len(jobs),
                     ", ".join(f"{job.job_id} ({self.entries[request_key(job)].crashes} crashes)"
                               for job in jobs[:10]))
        if self.path is not None:
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({k: dataclasses.asdict(e) for k, e in self.entries.items()}, indent=1)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".quarantine-", delete=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, self.path)

    def refusal(self, job: Job) -> str | None:
        """Why ``job`` is refused, or None."""
        entry = self.entries.get(request_key(job))
        if entry is None or not entry.is_refused:
            return None
        key = request_key(job)
        if key not in self._logged:
            self._logged.add(key)
            logger.warning("refusing quarantined request %s: %d crashes (%s)", job.job_id, entry.crashes,
                           entry.error)
        where = f" (its entry {key!r} in {self.path})" if self.path else ""
        return (f"request {job.job_id} was in flight when the scheduler crashed "
                f"{'once, the only request involved' if entry.crashes == 1 else f'{entry.crashes} times'} "
                f"({entry.error}); it is quarantined so that it cannot crash the scheduler again: "
                f"send a different request, or ask the operator to remove it{where}")
