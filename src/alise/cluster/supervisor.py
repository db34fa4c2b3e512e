"""`alise up`'s supervision: restart what dies or hangs; keep the rest of the cluster serving.

* A service that exits is restarted with exponential back-off (``initial_backoff_s``,
  doubling, at most ``max_backoff_s``). A worker's jobs recompute elsewhere meanwhile (the
  scheduler's doing); a scheduler's are kept by the workers, which hand them to the
  restarted one, and every client's SDK resumes its stream there.
* A service whose health listener gives no answer at all for ``hang_timeout_s`` while its
  process lives is hung (stopped, deadlocked): it is killed (SIGKILL) and restarted like one
  that died. Only an answer counts, not its status: a worker or the HTTP door answers
  NOT_SERVING while the scheduler is away, and is alive (alise.cluster.probe).
* A restarted service whose health listener gives no answer within ``startup_timeout_s`` of
  its start is killed likewise. One that answers NOT_SERVING (a worker loading its model, or
  waiting for a scheduler that is away) is left to come up.
* A service that dies ``crash_loop_after`` times in a row, each within ``stable_s`` of its
  start, is crash-looping: said once in the log with the end of its own, shown in the state
  file (and `alise status`) with its restarts and last exit, and restarted every
  ``max_backoff_s`` while the others serve. Once it has run ``stable_s`` it is well again.
* Start-up is stricter: a service that exits before it first serves is a configuration
  error (a bad flag, a corrupt index), reported with its log's tail, not retried.

The supervisor writes the cluster's processes, ports and log counts to ``state_file``
(JSON) while it runs; a write that fails (a full disk) is counted, said once in its log,
and tried again at the next change. Nothing the disk does stops the supervisor.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from alise.cluster.config import health_address, listen_addresses
from alise.cluster.local import LocalCluster
from alise.cluster.probe import LivenessProbe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    #: Seconds before the first restart of a service that died; doubled with each failure in a row.
    initial_backoff_s: float = 1.0
    #: The longest wait before a restart, also the pace of a crash-looping service's restarts.
    max_backoff_s: float = 30.0
    #: Seconds a service must run for its next death to start a new count of failures in a row.
    stable_s: float = 60.0
    #: A service that dies this many times in a row, each within stable_s of its start, is
    #: shown as crash-looping (restarted every max_backoff_s at most).
    crash_loop_after: int = 5
    #: A running service whose health listener gives no answer for this many seconds is hung:
    #: killed and restarted.
    hang_timeout_s: float = 3.0
    #: Seconds between probes of each running service's health listener.
    probe_interval_s: float = 1.0
    #: Seconds a service may take to start serving before `alise up` gives up; after a
    #: restart, to answer on its health listener before it is killed and restarted.
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("initial_backoff_s", "max_backoff_s", "stable_s", "hang_timeout_s", "probe_interval_s",
                     "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.crash_loop_after < 1:
            raise ValueError(f"crash_loop_after must be >= 1, got {self.crash_loop_after}")
        if self.hang_timeout_s < 2 * self.probe_interval_s:
            raise ValueError(f"hang_timeout_s must be at least two probes ({2 * self.probe_interval_s:g} s), "
                             f"got {self.hang_timeout_s}")

    def backoff_s(self, failures: int) -> float:
        return min(self.initial_backoff_s * 2 ** (failures - 1), self.max_backoff_s)


@dataclass
class _ServiceState:
    started_s: float
    probe: LivenessProbe
    serving: bool = False
    failures: int = 0
    restarts: int = 0
    restart_at_s: float | None = None
    last_exit_code: int | None = None
    #: Why its last process ended ("exit code 1", "killed: no health answer for 3 s", ...).
    last_exit: str = ""
    #: Why the supervisor is killing it now (None: it was not killed).
    kill_reason: str | None = None


@dataclass
class _StateFile:
    path: str | None
    num_failed_writes: int = 0
    last_error: str = ""
    #: What the last write tried to say, and when; a failed one is tried again after RETRY_S.
    attempted: dict = field(default_factory=dict)
    attempted_s: float = 0.0
    failed: bool = False

    RETRY_S = 5.0


class Supervisor:
    def __init__(self, cluster: LocalCluster, *, policy: RestartPolicy = RestartPolicy(),
                 state_file: str | None = None, info: dict | None = None) -> None:
        self.cluster = cluster
        self.policy = policy
        self._state_file = _StateFile(state_file)
        #: Cluster-wide facts for the state file (address, policy, ...).
        self.info = dict(info or {})
        self.states: dict[str, _ServiceState] = {}

    def start(self, timeout_s: float) -> None:
        """Starts every tier and waits until all serve; raises ServiceExited, TimeoutError."""
        self.cluster.start(timeout_s)  # waits for the predictor and the scheduler
        self.cluster.wait_healthy(timeout_s, names=[n for n in self.cluster.commands
                                                    if n not in ("predictor", "scheduler")])
        now = time.monotonic()
        self.states = {name: _ServiceState(started_s=now, probe=self._probe(name)) for name in self.cluster.commands}
        for state in self.states.values():
            state.serving = True
            state.probe.reset(now)
        self.write_state()

    def _probe(self, name: str) -> LivenessProbe:
        return LivenessProbe(health_address(name, self.cluster.commands[name]),
                             interval_s=self.policy.probe_interval_s, timeout_s=self.policy.hang_timeout_s)

    def run(self, should_stop: Callable[[], bool], tick_s: float = 0.2) -> None:
        """Supervises until ``should_stop()``."""
        try:
            while not should_stop():
                self.poll(time.monotonic())
                time.sleep(tick_s)
        finally:
            for state in self.states.values():
                state.probe.close()

    def poll(self, now: float) -> None:
        for name, state in self.states.items():
            if state.restart_at_s is not None:
                if now >= state.restart_at_s:
                    self._restart(name, state, now)
                continue
            code = self.cluster.procs[name].poll()
            if code is not None:
                self._on_exit(name, state, code, now)
            elif state.serving:
                self._check_alive(name, state, now)
            elif self.cluster.is_up(name):
                state.serving = True
                state.probe.reset(now)
                logger.info("%s is serving again (restart %d)", name, state.restarts)
            elif state.probe.poll(now) > self.policy.startup_timeout_s and state.kill_reason is None:
                self._kill(name, state, f"silent: no answer on its health listener ({state.probe.address}) "
                                        f"{self.policy.startup_timeout_s:g} s after its start")
        self.write_state(now)

    def _check_alive(self, name: str, state: _ServiceState, now: float) -> None:
        silent_s = state.probe.poll(now)
        if silent_s >= self.policy.hang_timeout_s and state.kill_reason is None:
            self._kill(name, state, f"hung: no answer on its health listener "
                                    f"({state.probe.address}) for {silent_s:.1f} s")
        elif state.failures and now - state.started_s >= self.policy.stable_s:
            if state.failures >= self.policy.crash_loop_after:
                logger.info("%s has run %.0f s since its restart: no longer crash-looping", name,
                            now - state.started_s)
            state.failures = 0

    def _kill(self, name: str, state: _ServiceState, reason: str) -> None:
        state.kill_reason = reason
        logger.error("%s (pid %d) is %s; killing it (SIGKILL) to restart it", name,
                     self.cluster.procs[name].pid, reason)
        self.cluster.procs[name].kill()

    def _on_exit(self, name: str, state: _ServiceState, code: int, now: float) -> None:
        log = self.cluster.log_path(name)
        ran_s = now - state.started_s
        state.failures = state.failures + 1 if ran_s < self.policy.stable_s else 1
        state.serving, state.last_exit_code = False, code
        state.last_exit = (f"killed: {state.kill_reason}" if state.kill_reason
                           else f"signal {-code}" if code < 0 else f"exit code {code}")
        state.kill_reason = None
        state.probe.close()
        delay = self.policy.backoff_s(state.failures)
        state.restart_at_s = now + delay
        logger.error("%s exited with code %d after %.1f s (%s); restarting it in %.1f s (see %s)",
                     name, code, ran_s, state.last_exit, delay, log)
        if state.failures == self.policy.crash_loop_after:
            logger.error("%s is crash-looping: it died %d times in a row, each within %g s of its start; it "
                         "is restarted every %g s at most while the rest of the cluster serves. The end of "
                         "%s:\n%s", name, state.failures, self.policy.stable_s, self.policy.max_backoff_s,
                         log, self.cluster.log_tail(name))

    def _restart(self, name: str, state: _ServiceState, now: float) -> None:
        self.cluster.start_one(name)
        state.restart_at_s, state.started_s = None, now
        state.probe.reset(now)
        state.restarts += 1

    def _service_state(self, state: _ServiceState | None) -> str:
        if state is None:
            return "starting"
        if state.serving:
            return "serving"
        if state.failures >= self.policy.crash_loop_after:
            return "crash-looping"
        return "restarting" if state.restart_at_s is not None else "starting"

    def snapshot(self) -> dict:
        """The cluster's processes, ports and logs, as the state file holds them."""
        services = {}
        for name, command in self.cluster.commands.items():
            proc, state = self.cluster.procs.get(name), self.states.get(name)
            log = self.cluster.logs.get(name)
            services[name] = {
                "pid": proc.pid if proc is not None and proc.poll() is None else None,
                "state": self._service_state(state),
                "restarts": state.restarts if state else 0,
                "failures_in_a_row": state.failures if state else 0,
                "last_exit_code": state.last_exit_code if state else None,
                "last_exit": state.last_exit if state else "",
                "listen": listen_addresses(command),
                "log": self.cluster.log_path(name),
                "log_lines_dropped": log.num_dropped_lines if log else 0,
                "log_error": log.last_error if log else "",
            }
        return {**self.info, "supervisor_pid": os.getpid(), "services": services}

    def write_state(self, now: float | None = None) -> None:
        """Writes the state file when what it says has changed, or a failed write is due again."""
        state_file = self._state_file
        if not state_file.path:
            return
        content = self.snapshot()
        now = time.monotonic() if now is None else now
        if content == state_file.attempted and not (state_file.failed and now - state_file.attempted_s
                                                     >= state_file.RETRY_S):
            return
        state_file.attempted, state_file.attempted_s = content, now
        tmp = f"{state_file.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**content, "state_writes_failed": state_file.num_failed_writes,
                           "state_write_error": state_file.last_error}, f, indent=1)
            os.replace(tmp, state_file.path)
        except OSError as exc:
            self._failed_write(tmp, exc)
            return
        state_file.failed = False

    def _failed_write(self, tmp: str, exc: OSError) -> None:
        state_file = self._state_file
        state_file.failed = True
        if not state_file.num_failed_writes:
            logger.warning("cannot write %s (%s): `alise status` shows what it last held until a write "
                           "succeeds; failed writes are counted", state_file.path, exc.strerror or exc)
        state_file.num_failed_writes += 1
        state_file.last_error = exc.strerror or str(exc)
        try:
            os.remove(tmp)
        except OSError:
            pass

    def remove_state(self) -> None:
        if self._state_file.path:
            try:
                os.remove(self._state_file.path)
            except FileNotFoundError:
                pass
