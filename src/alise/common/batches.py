"""Work that a burst of callers asks for one item at a time, done a batch at a time, each caller
answered in the order it asked.

``InOrderBatches`` runs a blocking batch function off the event loop (the scheduler's prompt
tokenization, the door's chat rendering); ``settle`` answers a batch's waiting callers from its
results, an exception standing for the item that raised it, so one bad item fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def outcome(fn: Callable[[], R]) -> R | Exception:
    """``fn()``, or the exception it raised."""
    try:
        return fn()
    except Exception as exc:
        return exc


def settle(answers: Iterable[asyncio.Future], results: Iterable[object]) -> None:
    """Each answer's result, or its exception where the result is one, in order (asyncio wakes
    the waiters first in, first out, so the callers resume in the order of ``answers``); an
    answer already done (its caller left) is passed over."""
    for answer, result in zip(answers, results, strict=True):
        if answer.done():
            continue
        if isinstance(result, BaseException):
            answer.set_exception(result)
        else:
            answer.set_result(result)


class InOrderBatches(Generic[T, R]):
    """Runs ``run_batch`` off the event loop, one call per batch, and answers each caller in
    the order it asked. ``run_batch(items)`` returns one result per item: its value, or the
    exception that item raises (an item that fails, fails alone).

    A batch is what has waited since the last one started, up to ``max_batch_weight`` (by
    ``weigh``; one item at least). Batches run one at a time: a heavy item delays those behind
    it, as the queue's FIFO order would. NOTE: answers are set in the order the items came, so
    their callers resume in that order: a burst leaves in the order it entered, one thread hop
    and loop wake-up a batch, not an item."""

    def __init__(self, run_batch: Callable[[list[T]], list[R | BaseException]], *,
                 weigh: Callable[[T], int] = lambda item: 1, max_batch_weight: int = 256) -> None:
        self.run_batch = run_batch
        self.weigh = weigh
        self.max_batch_weight = max_batch_weight
        self._waiting: list[tuple[T, asyncio.Future]] = []
        self._draining: asyncio.Task | None = None
        #: Batches run so far.
        self.num_batches = 0

    async def run(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return await future

    def _take(self) -> list[tuple[T, asyncio.Future]]:
        weight, n = 0, 0
        for item, _ in self._waiting:
            if n and weight + self.weigh(item) > self.max_batch_weight:
                break
            weight, n = weight + self.weigh(item), n + 1
        batch, self._waiting = self._waiting[:n], self._waiting[n:]
        return [(item, future) for item, future in batch if not future.done()]  # done: its caller left

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future]] = []
        try:
            while self._waiting:
                batch = self._take()
                if not batch:
                    continue
                try:
                    results = await asyncio.to_thread(self.run_batch, [item for item, _ in batch])
                except Exception as exc:  # run_batch itself failed: this batch's callers get its error
                    results = [exc] * len(batch)
                self.num_batches += 1
                settle([future for _, future in batch], results)
        except BaseException:  # cancelled (the loop stops): nobody is left waiting forever
            for _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._draining = None
