"""The CPU cluster of the HTTP benchmarks: `alise up`'s own commands (scheduler, worker(s), the
HTTP door, optionally the predictor) as real processes on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile

from alise.cluster.local import ClusterConfig, LocalCluster, service_commands
from alise.worker.config import WorkerConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cpu_cluster(*, predictor: bool = False, num_workers: int = 1, worker: WorkerConfig | None = None,
                model: str | None = None):
    """Yields (cluster, grpc address, http base URL); stops every process on the way out.
    ``worker``: every worker's settings (``alise up`` sets its listeners and model; default:
    the defaults)."""
    state = tempfile.mkdtemp(prefix="alise-http-bench-")
    http = f"127.0.0.1:{free_port()}"
    cfg = ClusterConfig(address=f"127.0.0.1:{free_port()}", model=model, num_workers=num_workers,
                        predictor=predictor, predictor_address=f"127.0.0.1:{free_port()}", state_dir=state,
                        worker_health_base_port=free_port(), worker=worker or WorkerConfig(), http_address=http,
                        http_health_address=f"127.0.0.1:{free_port()}")
    cluster = LocalCluster(service_commands(cfg), log_dir=f"{state}/logs")
    # The services run in their own sessions: a SIGTERM (a timeout) must still stop them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster.start()
    try:
        cluster.wait_healthy(300)
        yield cluster, cfg.address, f"http://{http}"
    finally:
        cluster.stop()


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (MiB)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
