"""Each standalone service refuses a port another program holds in one line that names the
port and its holder: exit 1, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("command, flag", [
    (["scheduler", "--worker-address", "127.0.0.1:0"], "--address"),
    (["scheduler", "--address", "127.0.0.1:0"], "--worker-address"),
    (["worker", "--scheduler", "127.0.0.1:9"], "--health-address"),
    (["predictor", "serve"], "--address"),
    (["http"], "--address"),
    (["http", "--address", "127.0.0.1:0"], "--health-address"),
])
def test_a_taken_port_is_one_line_naming_it(command, flag):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "alise.cli.main", *command, flag, f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "ALISE_LOG_FORMAT": "text"})
    service = command[0]
    assert out.returncode == 1, out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith(f"alise {service}: port {port} (127.0.0.1:{port}), for alise {service} {flag}, is "
                           f"already in use by pid {os.getpid()} ("), line
    assert line.endswith("; stop that process or choose another port (0 = any free port)"), line
