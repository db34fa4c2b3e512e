"""The door's own Prometheus metrics (``GET /metrics``); the scheduler's are on its
``--metrics-address``.

Requests by route and HTTP status, streams in flight, clients that left before the end, and
time to first token as the door sees it (from the request's arrival to the first piece).
"""

from __future__ import annotations

from alise.common.metrics import LATENCY_BUCKETS_S
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("alise_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.in_flight = Gauge("alise_http_generations_in_flight",
                               "Completions being relayed now", registry=r)
        self.disconnects = Counter("alise_http_client_disconnects",
                                   "Clients that closed the connection before the end (request cancelled)",
                                   registry=r)
        self.ttft = Histogram("alise_http_ttft_seconds", "Time to first token at the door",
                              buckets=LATENCY_BUCKETS_S, registry=r)
