"""One service of `alise up`: ``python -m alise.cluster.child <alise sub-command ...>``.

It runs the same ``alise`` sub-command as docker-compose does, after arranging to receive
SIGTERM (and so drain and exit) when its supervisor dies, however it dies: SIGKILL of
`alise up` leaves no orphaned service. On Linux the kernel delivers it (PR_SET_PDEATHSIG);
elsewhere a thread watches the parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

#: Set by the supervisor to its own pid: a child that finds another parent was orphaned
#: before it could ask for the signal.
SUPERVISOR_PID_ENV = "ALISE_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="parent-watch").start()
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    die_with_parent(int(os.environ.get(SUPERVISOR_PID_ENV) or os.getppid()))
    from alise.cli.main import main as alise_main

    return alise_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
