"""The expected waits of a worker's paused jobs, as the memory planner reads them.

A paused job's expected wait is the remaining time of every job ranked ahead of it (the
paper's rule, ``alise.core.memory_planner``). The sum runs over the ranked candidates, so it
is computed only when the memory planner first reads a wait: a plan whose paused jobs all stay
where they are (most plans that pause none or keep them) reads none.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from alise.core.table import JobTable


class ExpectedWaits(Mapping[str, float]):
    """Job id -> expected wait in seconds, for the paused jobs ``job_ids`` at ``positions``
    (increasing) of the ranked candidates ``order``.

    NOTE: read while the plan is made, before any of its moves changes the table (the memory
    planner's ``plan`` reads it before it returns its moves)."""

    def __init__(self, table: JobTable, order: np.ndarray, positions: np.ndarray, job_ids: list[str],
                 correction: float) -> None:
        self._table = table
        self._order = order
        self._positions = positions
        self._job_ids = job_ids
        self._correction = correction
        self._waits: dict[str, float] | None = None

    def _computed(self) -> dict[str, float]:
        if self._waits is None:
            table, order, positions = self._table, self._order, self._positions
            table.fill_remaining(order)
            # The jobs up to the last paused one: a cumulative sum's head is the head's sum.
            remaining_s = table.remaining_base_s[order[:positions[-1]]] * self._correction
            ahead = np.concatenate(([0.0], remaining_s.cumsum()))
            self._waits = dict(zip(self._job_ids, ahead[positions].tolist(), strict=True))
        return self._waits

    def __getitem__(self, job_id: str) -> float:
        return self._computed()[job_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._computed())

    def __len__(self) -> int:
        return len(self._job_ids)
