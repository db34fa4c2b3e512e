"""A tensor-parallel rank ends with ``os._exit`` (no interpreter teardown): what it wrote to its
stdout and stderr, pipes and so block-buffered, still reaches its parent, and its status is 0
after a clean return from ``follow``, 1 after an error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

RANK = textwrap.dedent("""
    import os, sys
    from alise.worker.tp_ranks import run_follower

    def follow(rank, config, store_path):
        print("stdout of rank", rank)
        sys.stderr.write("stderr of rank %d\\n" % rank)
        if config == "fail":
            raise RuntimeError("the rank's error")

    run_follower(1, sys.argv[1], "unused", os.getppid(), follow)
""")


@pytest.mark.parametrize(("how", "status"), [("ok", 0), ("fail", 1)])
def test_a_rank_that_exits_at_once_loses_nothing_it_wrote(how: str, status: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a worker run by hand
    done = subprocess.run([sys.executable, "-c", RANK, how], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == status, done.stderr
    assert done.stdout == "stdout of rank 1\n"
    assert "stderr of rank 1" in done.stderr
    assert ("the rank's error" in done.stderr) == (how == "fail")
