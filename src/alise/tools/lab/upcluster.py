"""`alise up` as the benchmarks run it: a real CPU cluster of processes on loopback, every port
a free one, in a temporary state directory; plus a health prober in a process of its own."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class UpCluster:
    """Started and ready on return. ``state_dir``: where its state and logs go (default: a
    temporary directory); ``env``: the processes' environment (default: this one's)."""

    def __init__(self, *up_args: str, workers: int = 1, state_dir: str | Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="alise-bench-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "alise.cli.main", "up", "--address", "127.0.0.1:0",
                   "--worker-address", "127.0.0.1:0", "--predictor-address", "127.0.0.1:0",
                   "--worker-health-port", "0", "--workers", str(workers), "--state-dir", str(self.state_dir),
                   *up_args]
        self._err = open(self.state_dir / "up.stderr", "wb")  # closed in stop()
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._err, env=env)
        self.state = self._wait_ready(600)
        self.address = self.state["address"]

    def services(self) -> dict:
        """The services as `alise up` sees them now (pids change as it restarts them)."""
        for _ in range(50):  # the file is replaced atomically, but read it again if caught mid-way
            try:
                return json.loads((self.state_dir / "cluster.json").read_text())["services"]
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.1)
        raise RuntimeError(f"no cluster file in {self.state_dir}")

    def _wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = (self.state_dir / "up.stderr").read_text(errors="replace")
            if "cluster ready" in text:
                return json.loads((self.state_dir / "cluster.json").read_text())
            if self.proc.poll() is not None:
                raise SystemExit(f"alise up exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.5)
        raise SystemExit(f"alise up not ready within {timeout_s:g} s")

    def pid(self, service: str) -> int:
        return self.state["services"][service]["pid"]

    def stop(self) -> int:
        """SIGTERM, then `alise up`'s exit code (SIGKILL after 120 s)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._err.close()
        return code


def probe_health(address: str, stop, results, interval_s: float = 0.1) -> None:
    """Runs in its own process until ``stop`` is set: (wall time sent, latency s or None,
    status) of each grpc.health.v1 Check, 1 s deadline, put on ``results`` at the end."""
    out = []
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            sent = time.time()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                out.append((sent, time.time() - sent, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)))
            except grpc.RpcError as exc:
                out.append((sent, None, exc.code().name))
            time.sleep(max(interval_s - (time.time() - sent), 0.0))
    results.put(out)
