"""Liveness: whether a service's process still answers, whatever it answers.

Every service serves grpc.health.v1 (a worker and the HTTP door on a health listener of
their own). Its *status* is readiness: a worker or the door says NOT_SERVING while the
scheduler is away, and must not be restarted for that. An *answer* of any kind is liveness:
a process that gives none within ``timeout_s`` is stopped (SIGSTOP), deadlocked or stuck in
a call that never returns. Probes are sent without waiting for them (grpc futures, one
fresh channel each, so no reconnect back-off of an old one stands in for an answer); the
supervisor's loop collects them on its next pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: Codes that mean no process answered (nothing listening, no answer in time).
_SILENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


@dataclass
class _Pending:
    channel: grpc.Channel
    future: grpc.Future
    sent_s: float


class LivenessProbe:
    """Probes one address every ``interval_s``; ``silent_s(now)`` is how long since the last
    probe that was answered was sent (0 right after ``reset``)."""

    def __init__(self, address: str, *, interval_s: float = 1.0, timeout_s: float = 1.0) -> None:
        self.address = address
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._pending: _Pending | None = None
        self._answered_s = 0.0
        self._sent_s = 0.0

    def reset(self, now: float) -> None:
        """Counts from ``now``: the service has just (re)started serving."""
        self.close()
        self._answered_s = self._sent_s = now

    def poll(self, now: float) -> float:
        """Collects a finished probe, sends the next when due; returns seconds of silence."""
        pending = self._pending
        if pending is not None and pending.future.done():
            if _answered(pending.future):
                self._answered_s = max(self._answered_s, pending.sent_s)
            self.close()
        if self._pending is None and now - self._sent_s >= self.interval_s:
            channel = grpc.insecure_channel(self.address)
            future = health_pb2_grpc.HealthStub(channel).Check.future(
                health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
            self._pending = _Pending(channel, future, now)
            self._sent_s = now
        return now - self._answered_s

    def close(self) -> None:
        if self._pending is not None:
            self._pending.future.cancel()
            self._pending.channel.close()
            self._pending = None


def _answered(future: grpc.Future) -> bool:
    """Any answer, SERVING or not, even an error a server chose to send, is a live process."""
    if future.cancelled():
        return False
    exc = future.exception()
    return exc is None or exc.code() not in _SILENT
