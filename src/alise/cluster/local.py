"""The local cluster's processes: started, watched, stopped.

The processes run exactly the commands that docker-compose.yml gives its services
(``alise.cluster.config.service_commands``); a cluster test starts the compose file's
commands the same way. Each process runs under ``alise.cluster.child``, which makes it die
with its parent; its stdout and stderr go through a pipe into its rotated log
(alise.cluster.logfiles), so what the disk does never blocks or stops a service.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.cluster.child import SUPERVISOR_PID_ENV

# The cluster's settings and commands, importable from here as before.
from alise.cluster.config import ClusterConfig, health_address, listen_addresses, service_commands  # noqa: F401
from alise.cluster.logfiles import LogLimits, LogPump, RotatingLog
from alise.common.ports import owns_listener, split_address

logger = logging.getLogger(__name__)


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class ServiceExited(RuntimeError):
    """A service ended while the cluster waited for it; the message ends with its log's tail."""


@dataclass
class LocalCluster:
    commands: dict[str, list[str]]
    log_dir: str
    env: dict[str, str] = field(default_factory=dict)
    log_limits: LogLimits = field(default_factory=LogLimits)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    #: Each service's log, kept across its restarts.
    logs: dict[str, RotatingLog] = field(default_factory=dict)
    _pumps: dict[str, LogPump] = field(default_factory=dict, init=False, repr=False)

    def start(self, tier_timeout_s: float = 300.0) -> None:
        """Starts the predictor, waits until it serves, then the scheduler likewise, then the
        workers: each tier dials the one before, so it never starts against a closed port."""
        for name in self.commands:
            self.start_one(name)
            if name in ("predictor", "scheduler"):
                self.wait_healthy(tier_timeout_s, names=[name])

    def start_one(self, name: str) -> subprocess.Popen:
        """Starts (or restarts) one service with its command; its log is appended to.

        NOTE: the child's parent-death signal fires when the *thread* that started it ends,
        so services are started from one long-lived thread (the supervisor's main thread).
        """
        args = self.commands[name]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", SUPERVISOR_PID_ENV: str(os.getpid()), **self.env}
        if name not in self.logs:
            os.makedirs(self.log_dir, exist_ok=True)
            self.logs[name] = RotatingLog(self.log_path(name), self.log_limits)
        # Its own session: a Ctrl-C in the terminal reaches `alise up` only, which then
        # drains the services in order.
        proc = subprocess.Popen([sys.executable, "-m", "alise.cluster.child", *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = proc
        self._pumps[name] = LogPump(proc.stdout, self.logs[name], name)
        logger.info("started %s (pid %d): alise %s", name, proc.pid, " ".join(args))
        return proc

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def log_tail(self, name: str, num_lines: int = 15) -> str:
        """The end of a service's log; what an ended process wrote is in it."""
        if name in self._pumps and self.procs[name].poll() is not None:
            self._pumps[name].join(2.0)
        try:
            with open(self.log_path(name), "rb") as f:
                f.seek(max(os.path.getsize(self.log_path(name)) - 16384, 0))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-num_lines:])

    def is_up(self, name: str, timeout_s: float = 0.5) -> bool:
        """Running, SERVING on its health address, and the listener there is its own."""
        proc = self.procs[name]
        address = health_address(name, self.commands[name])
        if proc.poll() is not None or not is_serving(address, timeout_s):
            return False
        return owns_listener(proc.pid, split_address(address)[1]) is not False

    def wait_healthy(self, timeout_s: float, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.commands if names is None else names)
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise ServiceExited(f"{name} exited with code {proc.returncode} before it served; "
                                        f"the end of {self.log_path(name)}:\n{self.log_tail(name)}")
                if self.is_up(name):
                    logger.info("%s is serving", name)
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout_s:g} s: {', '.join(pending)}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 30.0) -> dict[str, int]:
        """Drains the scheduler first, while the workers still run its requests, then the
        rest in reverse start order; SIGKILL for what outlives the grace period. Returns each
        process's exit code (a service that had already died keeps its own)."""
        first = [n for n in self.procs if n == "scheduler"]
        rest = [n for n in reversed(list(self.procs)) if n != "scheduler"]
        codes: dict[str, int] = {}
        for names in (first, rest):
            for name in names:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for name in names:
                proc = self.procs[name]
                try:
                    codes[name] = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not drain within %g s; killing it", name, grace_s)
                    proc.kill()
                    codes[name] = proc.wait()
        for name, pump in self._pumps.items():
            pump.join(2.0)
            self.logs[name].close()
        return {name: codes[name] for name in self.procs}
