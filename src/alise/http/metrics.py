"""``GET /metrics``: the cluster's metrics where vLLM users look for them, beside the door's own.

The scheduler holds the cluster's figures; its ``GetMetrics`` answers them in Prometheus'
text format: ALISE's families (``alise_*``: predicted against true lengths, preemptions by KV
action, KV blocks per worker, ...) and vLLM's where the meaning is the same (``vllm:*``). The
door parses them, adds its own counters, and serves one exposition in which every family
name appears once:

* the door's families (``alise_http_*``: requests by route and status, streams in flight,
  clients that left, time to first token at the door);
* requests the door itself finished on a stop string. The scheduler saw those cancelled, so
  the door counts them, in the scheduler's families (``vllm:request_success_total
  {finished_reason="stop"}``, latency and token histograms, ``alise_requests_total
  {outcome="finished"}``): samples with the same name and labels are added;
* ``model_name`` (the served name, as vLLM's carry) on every family but the door's own.

A scheduler that does not answer in time costs its families, not the scrape: the door's are
served alone and ``alise_http_scheduler_metrics_up`` says 0.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from alise.common.metrics import LATENCY_BUCKETS_S, VllmRequestMetrics


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
        self.scheduler_up = Gauge("alise_http_scheduler_metrics_up",
                                  "1 when this scrape holds the scheduler's metrics", registry=r)
        # The scheduler's families, for the requests the door finished itself.
        self.finished = Counter("alise_requests", "Generate requests by outcome", ["outcome"], registry=r)
        self.vllm = VllmRequestMetrics(r)

    def watch_connections(self, guard) -> None:
        """Open connections (idle or busy) and those the door closed, read from ``guard``."""
        self.registry.register(_Connections(guard))

    def stopped_by_string(self, e2e_s: float, prompt_tokens: int, completion_tokens: int,
                          max_tokens: int | None) -> None:
        """A request the door ended on a stop string: finished, as vLLM counts it."""
        self.finished.labels("finished").inc()
        self.vllm.observe_finished("stop", e2e_s, prompt_tokens, completion_tokens, max_tokens)


def merged_exposition(scheduler_text: str, own_text: str, model_name: str | None) -> bytes:
    """One exposition of both texts; see the module docstring for the rules."""
    families = {f.name: f for f in text_string_to_metric_families(scheduler_text)}
    for family in text_string_to_metric_families(own_text):
        into = families.get(family.name)
        if into is None:
            families[family.name] = family
        elif into.type == family.type:
            into.samples = _add_samples(into.samples, family.samples)
    if model_name:
        for family in families.values():
            if not family.name.startswith("alise_http_"):
                family.samples = [s._replace(labels={**s.labels, "model_name": model_name}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def _add_samples(first: list, second: list) -> list:
    """Samples of one family from two sources: equal name and labels are added, except the
    ``_created`` timestamps, of which the earlier is kept."""
    merged = {(s.name, tuple(sorted(s.labels.items()))): s for s in first}
    for s in second:
        key = (s.name, tuple(sorted(s.labels.items())))
        have = merged.get(key)
        if have is None:
            merged[key] = s
        elif s.name.endswith("_created"):
            merged[key] = have._replace(value=min(have.value, s.value))
        else:
            merged[key] = have._replace(value=have.value + s.value)
    return list(merged.values())


class _Connections:
    def __init__(self, guard) -> None:
        self.guard = guard

    def collect(self):
        g = self.guard
        state = GaugeMetricFamily("alise_http_connections", "Open connections by state (idle: no request "
                                  "in progress)", labels=["state"])
        state.add_metric(["idle"], len(g.idle))
        state.add_metric(["busy"], len(g.busy))
        closed = CounterMetricFamily("alise_http_connections_closed", "Connections the door closed, by why",
                                     labels=["reason"])
        for reason, n in sorted(g.num_closed.items()):
            closed.add_metric([reason], n)
        return [state, closed]


class _Families:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return self.families
