"""The engines of a tensor-parallel worker: rank 0's drives, the others follow it step for step.

Every rank runs a whole :class:`WorkerEngine` over its slice of the model and its slice of each
KV block. Rank 0's (:class:`DriverEngine`) is the worker service's: before it applies anything
that changes its state (a plan, aborts, a new session, holding or dropping its jobs) it sends
the same call, as a typed message, to the other ranks, whose engines apply it in :func:`follow`.

Invariant: the engines stay equal, block ids and all. An engine's state follows only from the
messages it applied and the tokens its steps sampled; rank 0 samples and every rank takes its
tokens (``alise.worker.model.tp_serving.TpExecutor``), and the KV movers make every choice
without looking at the clock (a swap-out's blocks are taken back when an allocation needs them,
never because a copy happened to have landed). So a block id, a chunk or a refusal on rank 0 is
the same on every rank, and the ranks' forward passes meet at the same collectives.

A step that raises on rank 0 leaves the other ranks inside a collective: the replica cannot go
on, so ``on_failure`` (the rank group's) takes the whole worker down; the scheduler requeues its
jobs as for any worker that dies. No torch here: ``send`` and ``receive`` are the rank group's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from alise.core.commands import HeldJob, StepPlan, StepReport
from alise.worker.engine import Executor, WorkerEngine
from alise.worker.kv_manager import KvManager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    plan: StepPlan


@dataclass(frozen=True)
class Abort:
    job_ids: tuple[str, ...]
    through: int


@dataclass(frozen=True)
class NewSession:
    pass


@dataclass(frozen=True)
class Hold:
    pass


@dataclass(frozen=True)
class AbortAll:
    pass


@dataclass(frozen=True)
class Stop:
    """The worker is stopping: the follower returns."""


EngineMessage = RunPlan | Abort | NewSession | Hold | AbortAll | Stop


class DriverEngine(WorkerEngine):
    """Rank 0's engine: each state change is sent to the other ranks, then applied here."""

    def __init__(self, executor: Executor, kv: KvManager, *, eos_token_id: int | None, max_model_len: int,
                 send: Callable[[EngineMessage], object], on_failure: Callable[[str], None]) -> None:
        super().__init__(executor, kv, eos_token_id=eos_token_id, max_model_len=max_model_len)
        self._send = send
        self._on_failure = on_failure
        # The step thread and the event loop (hold, abort_all) both send: one message and its
        # collectives at a time, in the same order on every rank.
        self._lock = threading.Lock()

    def _lockstep(self, message: EngineMessage, apply: Callable[[], object]):
        with self._lock:
            try:
                self._send(message)
                return apply()
            except Exception as exc:
                self._on_failure(f"{type(message).__name__} failed on rank 0: {type(exc).__name__}: {exc}")
                raise

    def run(self, plan: StepPlan) -> StepReport:
        return self._lockstep(RunPlan(plan), lambda: super(DriverEngine, self).run(plan))

    def abort(self, job_ids: Iterable[str], through: int = -1) -> None:
        ids = tuple(job_ids)
        self._lockstep(Abort(ids, through), lambda: super(DriverEngine, self).abort(ids, through))

    def new_session(self) -> None:
        self._lockstep(NewSession(), super().new_session)

    def hold(self) -> list[HeldJob]:
        return self._lockstep(Hold(), super().hold)

    def abort_all(self) -> None:
        self._lockstep(AbortAll(), super().abort_all)

    def stop_followers(self) -> None:
        with self._lock:
            self._send(Stop())


def follow(engine: WorkerEngine, receive: Callable[[], EngineMessage]) -> None:
    """Applies rank 0's messages to ``engine`` until it says :class:`Stop`."""
    while True:
        match receive():
            case RunPlan(plan):
                engine.run(plan)
            case Abort(job_ids, through):
                engine.abort(job_ids, through)
            case NewSession():
                engine.new_session()
            case Hold():
                engine.hold()
            case AbortAll():
                engine.abort_all()
            case Stop():
                return
            case other:
                raise TypeError(f"not an engine message: {other!r}")
