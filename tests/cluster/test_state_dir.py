"""`alise up` on a state directory the disk refuses: full (a 2 MB tmpfs, filled) it keeps
serving, restarting what dies, and counts the log lines it had to drop; read-only it says
so in one line. Both need a tmpfs mount (root with CAP_SYS_ADMIN, as CI runs); the writer's
own handling of ENOSPC is also tested without one (test_up_flags.py, on /dev/full)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_up import SMALL_WORKERS, Up, is_running, wait_until

from alise.client import Client

pytestmark = pytest.mark.cluster


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Writes a file until the filesystem has no room left."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as f:
        while True:
            f.write(b"\0" * 512)
    return filler


def test_a_full_state_dir_degrades_but_the_cluster_serves(tmp_path, tiny_llama_dir, monkeypatch):
    # DEBUG lines, so the services write more than the room left in their logs' last pages.
    monkeypatch.setenv("ALISE_LOG_LEVEL", "DEBUG")
    with tmpfs(tmp_path / "small", "size=2m") as small:
        up = Up(tmp_path, str(tiny_llama_dir), "--no-predictor", *SMALL_WORKERS, state_dir=small)
        try:
            up.wait_ready()
            filler = fill(small)
            worker = up.state()["services"]["worker-0"]
            os.kill(worker["pid"], signal.SIGKILL)  # its restart is a state change the full disk refuses
            wait_until(lambda: "cannot write" in up.stderr and "cluster.json" in up.stderr, 60,
                       "the failed state write said")
            with Client(up.address) as client:
                wait_until(lambda: len(client.status().workers) == 1, 120, "worker-0 back")
                for _ in range(4):
                    done = client.complete("on a full disk", max_tokens=16, ignore_eos=True)
                    assert len(done.token_ids) == 16
            assert up.proc.poll() is None and is_running(worker["pid"]) is False
            filler.unlink()

            def counted() -> bool:
                state = up.state()
                return state["state_writes_failed"] >= 1 and state["services"]["worker-0"]["log_lines_dropped"] > 0
            wait_until(counted, 30, "the dropped lines and failed writes in the state file")
            text = subprocess.run([sys.executable, "-m", "alise.cli.main", "status", "--address", up.address,
                                   "--state-dir", str(small)], capture_output=True, text=True, check=True).stdout
            assert "lines dropped (No space left on device)" in text, text
            assert "writes failed (No space left on device)" in text, text
        finally:
            up.close()
        assert up.proc.returncode == 0, up.stderr[-3000:]


def test_a_read_only_state_dir_is_one_line_and_exit_2(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        out = subprocess.run([sys.executable, "-m", "alise.cli.main", "up", "--state-dir", str(ro)],
                             capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr, out.stdout) == (
        2, f"alise up: cannot use --state-dir {ro}: Read-only file system\n", "")


def test_alise_up_whose_own_output_the_disk_refuses_runs_and_stops_cleanly(tmp_path):
    """Its stderr on a full disk (/dev/full: every write ENOSPC): the lines are dropped, the
    scheduler serves, SIGTERM still drains it (exit 0)."""
    from test_up import Up

    with open("/dev/full", "wb") as full:
        proc = subprocess.Popen([sys.executable, "-m", "alise.cli.main", "up", "--no-predictor", "--workers", "0",
                                 "--http-address", "", "--address", "127.0.0.1:0", "--worker-address", "127.0.0.1:0",
                                 "--state-dir", str(tmp_path / "state")], stdout=full, stderr=full, cwd=tmp_path)
    up = Up.__new__(Up)
    up.proc, up.state_dir = proc, tmp_path / "state"
    try:
        wait_until(lambda: (up.state_dir / "cluster.json").exists() or proc.poll() is not None, 120, "cluster up")
        assert proc.poll() is None
        with Client(up.address) as client:
            assert client.status().policy == "alise"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
