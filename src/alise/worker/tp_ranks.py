"""The processes of a tensor-parallel worker: rank 0 is the worker process itself (it talks to
the scheduler), ranks 1..N-1 are children it starts (``spawn``: nothing of its event loop or gRPC
state is forked) that load their slices and follow rank 0's engine (alise.worker.tp_engine).

The replica lives and dies whole. A child that exits while the worker runs takes the worker down
at once, with exit status :data:`EXIT_RANK_DIED`: rank 0's next collective would wait for it
forever, and the scheduler requeues a dead worker's jobs. A child whose parent is gone exits too.
The ranks meet through a file store in a private temp dir (torch.distributed's ``file://``), so
no port is chosen and none can be taken. No torch here; the children import it.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from alise.worker.config import WorkerConfig

logger = logging.getLogger(__name__)

#: The worker's exit status when one of its ranks died.
EXIT_RANK_DIED = 3


class RankGroup:
    """Ranks 1..N-1 of this worker's replica, as child processes, and their watchdog."""

    def __init__(self, config: WorkerConfig, follow: Callable[[int, WorkerConfig, str], None]) -> None:
        self.config = config
        self.world_size = config.tensor_parallel_size
        self._dir = tempfile.mkdtemp(prefix="alise-tp-")
        self.store_path = os.path.join(self._dir, "store")
        self._stopping = False
        self._stop_followers: Callable[[], None] | None = None
        context = multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=run_follower, name=f"alise-worker-rank{rank}", daemon=True,
                                          args=(rank, config, self.store_path, os.getpid(), follow))
                          for rank in range(1, self.world_size)]

    def start(self) -> None:
        for process in self.processes:
            process.start()
        threading.Thread(target=self._watch, name="tp-rank-watchdog", daemon=True).start()
        atexit.register(self.stop)
        logger.info("tensor parallel: ranks 1..%d started (pids %s)", self.world_size - 1,
                    ", ".join(str(p.pid) for p in self.processes))

    def on_stop(self, stop_followers: Callable[[], None]) -> None:
        """How to ask the followers to return (rank 0's engine sends them Stop)."""
        self._stop_followers = stop_followers

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self.processes}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._stopping:
            return
        process = sentinels[ready[0]]
        process.join(0.1)
        self.fail(f"{process.name} (pid {process.pid}) exited with status {process.exitcode}")

    def fail(self, reason: str) -> None:
        """The replica cannot go on: end every rank and this process, now."""
        self._stopping = True
        logger.critical("tensor-parallel worker going down: %s; the scheduler requeues its jobs", reason)
        for process in self.processes:
            if process.is_alive():
                process.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
        logging.shutdown()
        os._exit(EXIT_RANK_DIED)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the followers (Stop, then kill what is left) and removes the store."""
        if self._stopping:
            return
        self._stopping = True
        if self._stop_followers is not None:
            try:
                self._stop_followers()
            except Exception:  # a rank already gone: it is killed below
                logger.exception("could not tell the ranks to stop")
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)
        shutil.rmtree(self._dir, ignore_errors=True)


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(EXIT_RANK_DIED)


def run_follower(rank: int, config: WorkerConfig, store_path: str, parent_pid: int,
                 follow: Callable[[int, WorkerConfig, str], None]) -> None:
    """A child's life: ``follow`` (``tp_serving.follow_rank``: load its slices, follow rank 0)
    until Stop (status 0) or an error (1). Either way the process ends at once: past its process
    group's destroy, the interpreter's teardown of torch's objects has nothing left to do but
    could still end in std::terminate (SIGABRT) and turn a clean stop into a crash."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    try:
        follow(rank, config, store_path)
    except BaseException:
        logger.exception("rank %d failed", rank)
        _exit_now(1)
    _exit_now(0)


def _exit_now(status: int) -> None:
    """Ends the process with ``status``, skipping the interpreter's teardown but not what the
    rank wrote: its stdout and stderr are pipes (block-buffered unless PYTHONUNBUFFERED)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
