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
    def __init__(self, *up_args: str, workers: int = 1) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="alise-bench-"))
        command = [sys.executable, "-m", "alise.cli.main", "up", "--address", "127.0.0.1:0",
                   "--worker-address", "127.0.0.1:0", "--predictor-address", "127.0.0.1:0",
                   "--worker-health-port", "0", "--workers", str(workers), "--state-dir", str(self.state_dir),
                   *up_args]
        self._err = open(self.state_dir / "up.stderr", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._err)
        self.state = self._wait_ready(600)
        self.address = self.state["address"]

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

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._err.close()


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
