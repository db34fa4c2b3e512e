"""`alise up`'s supervision: restart what dies, stop only for what cannot go on.

* A service that exits is restarted with exponential back-off. A worker's jobs recompute
  elsewhere meanwhile (the scheduler's doing); a scheduler's are kept by the workers, which
  hand them to the restarted one, and every client's SDK resumes its stream there: in-flight
  streams continue either way.
* A service that keeps dying soon after each start (``max_consecutive_failures`` times in
  a row, each within ``stable_s`` of starting) is in a crash loop: the cluster stops.
* Start-up is stricter: a service that exits before it first serves is a configuration
  error (a bad flag, a corrupt index), reported with its log's tail, not retried.

The supervisor writes the cluster's processes and ports to ``state_file`` (JSON) while it
runs; `alise status` shows them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from alise.cluster.local import LocalCluster, listen_addresses

logger = logging.getLogger(__name__)

class ClusterFailed(RuntimeError):
    """The cluster cannot go on (a service is in a crash loop)."""


@dataclass(frozen=True)
class RestartPolicy:
    #: Wait before the first restart; it doubles with each failure in a row.
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    #: A run shorter than this counts as a failure in a row; a longer one resets the count.
    stable_s: float = 60.0
    #: Failures in a row that make a crash loop.
    max_consecutive_failures: int = 5

    def __post_init__(self) -> None:
        for name in ("initial_backoff_s", "max_backoff_s", "stable_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {self.max_consecutive_failures}")

    def backoff_s(self, failures: int) -> float:
        return min(self.initial_backoff_s * 2 ** (failures - 1), self.max_backoff_s)


@dataclass
class _ServiceState:
    started_s: float
    serving: bool = False
    failures: int = 0
    restarts: int = 0
    restart_at_s: float | None = None
    last_exit_code: int | None = None


class Supervisor:
    def __init__(self, cluster: LocalCluster, *, policy: RestartPolicy = RestartPolicy(),
                 state_file: str | None = None, info: dict | None = None) -> None:
        self.cluster = cluster
        self.policy = policy
        self.state_file = state_file
        #: Cluster-wide facts for the state file (address, policy, ...).
        self.info = dict(info or {})
        self.states: dict[str, _ServiceState] = {}

    def start(self, timeout_s: float) -> None:
        """Starts every tier and waits until all serve; raises ServiceExited, TimeoutError."""
        self.cluster.start(timeout_s)  # waits for the predictor and the scheduler
        now = time.monotonic()
        self.states = {name: _ServiceState(started_s=now) for name in self.cluster.commands}
        self.cluster.wait_healthy(timeout_s, names=[n for n in self.cluster.commands
                                                    if n not in ("predictor", "scheduler")])
        for state in self.states.values():
            state.serving = True
        self.write_state()

    def run(self, should_stop: Callable[[], bool], tick_s: float = 0.2) -> None:
        """Supervises until ``should_stop()``; raises ClusterFailed when the cluster cannot go on."""
        while not should_stop():
            self.poll(time.monotonic())
            time.sleep(tick_s)

    def poll(self, now: float) -> None:
        changed = False
        for name, state in self.states.items():
            if state.restart_at_s is not None:
                if now >= state.restart_at_s:
                    self._restart(name, state, now)
                    changed = True
                continue
            code = self.cluster.procs[name].poll()
            if code is not None:
                self._on_exit(name, state, code, now)
                changed = True
            elif not state.serving and self.cluster.is_up(name):
                state.serving = True
                logger.info("%s is serving again (restart %d)", name, state.restarts)
                changed = True
        if changed:
            self.write_state()

    def _on_exit(self, name: str, state: _ServiceState, code: int, now: float) -> None:
        log = self.cluster.log_path(name)
        ran_s = now - state.started_s
        state.failures = state.failures + 1 if ran_s < self.policy.stable_s else 1
        state.serving, state.last_exit_code = False, code
        if state.failures >= self.policy.max_consecutive_failures:
            raise ClusterFailed(
                f"{name} is in a crash loop: it died {state.failures} times in a row, each within "
                f"{self.policy.stable_s:g} s of starting (last exit code {code}); stopping the "
                f"cluster. The end of {log}:\n{self.cluster.log_tail(name)}")
        delay = self.policy.backoff_s(state.failures)
        state.restart_at_s = now + delay
        logger.error("%s exited with code %d after %.1f s; restarting it in %.1f s (see %s)",
                     name, code, ran_s, delay, log)

    def _restart(self, name: str, state: _ServiceState, now: float) -> None:
        self.cluster.start_one(name)
        state.restart_at_s, state.started_s = None, now
        state.restarts += 1

    def snapshot(self) -> dict:
        """The cluster's processes and ports, as the state file holds them."""
        services = {}
        for name, command in self.cluster.commands.items():
            proc, state = self.cluster.procs.get(name), self.states.get(name)
            services[name] = {
                "pid": proc.pid if proc is not None and proc.poll() is None else None,
                "state": ("restarting" if state and state.restart_at_s is not None
                          else "serving" if state and state.serving else "starting"),
                "restarts": state.restarts if state else 0,
                "last_exit_code": state.last_exit_code if state else None,
                "listen": listen_addresses(command),
                "log": self.cluster.log_path(name),
            }
        return {**self.info, "supervisor_pid": os.getpid(), "services": services}

    def write_state(self) -> None:
        if not self.state_file:
            return
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.snapshot(), f, indent=1)
        os.replace(tmp, self.state_file)

    def remove_state(self) -> None:
        if self.state_file:
            try:
                os.remove(self.state_file)
            except FileNotFoundError:
                pass
