"""Prometheus metrics, one registry per service instance, served over HTTP on demand.

Event metrics (histograms, counters) are updated where the event happens; state metrics
(queue lengths, KV blocks) are read from the live objects at scrape time by a collector,
so the hot path pays nothing for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
ERROR_BUCKETS_TOKENS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class StateCollector:
    """Gauges computed at scrape time from ``read()``: [(name, help, labels, samples)]."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, list[str], list[tuple[list[str], float]]]]]):
        self._read = read

    def collect(self):
        for name, documentation, labels, samples in self._read():
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for label_values, value in samples:
                family.add_metric(label_values, value)
            yield family


def serve_metrics(registry: CollectorRegistry, address: str) -> int:
    """Starts the HTTP exporter on ``address`` (HOST:PORT, port 0 = any); returns the port."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    bound = server.server_address[1]
    logger.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", bound)
    return bound


class _LiveWorkersOnly:
    """Collects ``metric`` (labelled first by worker id) after dropping the series of workers
    no longer connected, so a departed worker leaves no stale series behind."""

    def __init__(self, metric, live: Callable[[], Iterable[str]]) -> None:
        self.metric = metric
        self.live = live

    def collect(self):
        live = set(self.live())
        departed = {s.labels["worker"] for family in self.metric.collect() for s in family.samples} - live
        for worker_id in departed:
            self.metric.remove(worker_id)
        return self.metric.collect()


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("alise_requests", "Generate requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("alise_generated_tokens", "Tokens streamed to clients", registry=r)
        self.ttft = Histogram("alise_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("alise_tpot_seconds", "Time per output token after the first",
                              buckets=TOKEN_TIME_BUCKETS_S, registry=r)
        self.e2e = Histogram("alise_e2e_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS_S,
                             registry=r)
        self.prediction_error = Histogram("alise_prediction_abs_error_tokens",
                                          "|predicted - true| output length of finished requests",
                                          buckets=ERROR_BUCKETS_TOKENS, registry=r)
        self.step = Histogram("alise_step_seconds", "Worker step duration", ["worker"],
                              buckets=TOKEN_TIME_BUCKETS_S, registry=r)

    def watch(self, read) -> None:
        self.registry.register(StateCollector(read))

    def forget_departed_workers(self, live: Callable[[], Iterable[str]]) -> None:
        """From now on, per-worker series are collected only for the workers ``live()`` lists."""
        self.registry.unregister(self.step)
        self.registry.register(_LiveWorkersOnly(self.step, live))


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Histogram("alise_worker_step_seconds", "Model step duration",
                              buckets=TOKEN_TIME_BUCKETS_S, registry=r)
        self.tokens = Counter("alise_worker_tokens", "Tokens processed by kind", ["kind"], registry=r)
        self.refused = Counter("alise_worker_refused_commands", "Commands refused", ["command"], registry=r)
        self.step_failures = Counter("alise_worker_step_failures", "Steps that raised (jobs handed back, "
                                     "worker reconnected)", registry=r)
        self.plan_wait = Histogram("alise_worker_plan_wait_seconds", "Time the worker waited for its next "
                                   "plan while it had running jobs (the device idle on the scheduler)",
                                   buckets=TOKEN_TIME_BUCKETS_S, registry=r)

    def watch(self, read) -> None:
        self.registry.register(StateCollector(read))
