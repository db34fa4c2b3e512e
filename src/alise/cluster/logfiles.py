"""The services' log files under `alise up`: bounded by size, and never a reason to stop.

Each service's stdout and stderr go to a pipe that one thread of the supervisor (a
:class:`LogPump`) drains into a :class:`RotatingLog`: NAME.log, rotated to NAME.log.1 ...
NAME.log.N once it would pass its size, so a service's logs never take more than
``(backups + 1) * max_bytes``. A write that fails (a full disk, a read-only remount) drops
those lines and counts them; the service never blocks on its output, whatever the disk does.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogLimits:
    #: Size in MB (MiB) at which each service's log is rotated.
    max_mb: float = 50.0
    #: Rotated logs kept per service, NAME.log.1 ... NAME.log.N (0 = the log is emptied instead).
    backups: int = 3

    @property
    def max_bytes(self) -> int:
        return max(int(self.max_mb * 2**20), 1)

    def describe(self) -> str:
        size = f"{self.max_mb:g} MB" if self.max_mb >= 1 else f"{self.max_bytes:,} bytes"
        return f"rotated at {size}, {self.backups} kept"

    def __post_init__(self) -> None:
        if not self.max_mb > 0:
            raise ValueError(f"max_mb must be > 0, got {self.max_mb}")
        if self.backups < 0:
            raise ValueError(f"backups must be >= 0, got {self.backups}")


class RotatingLog:
    """Appends bytes to ``path``, rotating by size; a failed write is dropped and counted.

    Thread-safe: a service's successive processes (restarts) write to one log."""

    def __init__(self, path: str, limits: LogLimits = LogLimits()) -> None:
        self.path = path
        self.limits = limits
        self.num_dropped_lines = 0
        #: Why the last write failed ("" = none has).
        self.last_error = ""
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                if self._fd is None:
                    self._open()
                if self._size and self._size + len(data) > self.limits.max_bytes:
                    self._rotate()
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    self._size += written
                    view = view[written:]
            except OSError as exc:
                self._drop(data, exc)

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = None
        if self.limits.backups:
            for i in range(self.limits.backups - 1, 0, -1):
                if os.path.exists(f"{self.path}.{i}"):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        self._open()

    def _drop(self, data: bytes, exc: OSError) -> None:
        first = not self.num_dropped_lines
        self.num_dropped_lines += max(data.count(b"\n"), 1)
        self.last_error = exc.strerror or str(exc)
        if first:
            # Said once per log; `alise status` shows the count from here on.
            logger.warning("cannot write %s (%s): its lines are dropped and counted until it can "
                           "(`alise status` shows how many)", self.path, self.last_error)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class LogPump:
    """Drains one process's output pipe into a RotatingLog, on a thread of its own, until the
    pipe closes (the process and any child holding the pipe are gone)."""

    def __init__(self, pipe, log: RotatingLog, name: str) -> None:
        self._fd = pipe.fileno()
        self._pipe = pipe
        self.log = log
        self._thread = threading.Thread(target=self._run, name=f"log-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while chunk := os.read(self._fd, 65536):
                self.log.write(chunk)
        except OSError as exc:  # the pipe itself failed: nothing more can be read from it
            logger.warning("reading the output of %s failed: %s", self.log.path, exc)
        finally:
            self._pipe.close()

    def join(self, timeout_s: float) -> None:
        """Waits (at most ``timeout_s``) until everything the process wrote is in its log."""
        self._thread.join(timeout_s)
