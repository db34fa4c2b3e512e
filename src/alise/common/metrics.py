"""Prometheus metrics, one registry per service instance, served over HTTP on demand.

Event metrics (histograms, counters) are updated where the event happens; state metrics
(queue lengths, KV blocks) are read from the live objects at scrape time by a collector,
so the hot path pays nothing for them.

The scheduler keeps, beside ALISE's own families (``alise_*``), the families vLLM's server
exports where the meaning is the same (``vllm:*``, with vLLM's names and buckets), so
dashboards and alerts written for vLLM read an ALISE cluster: the HTTP door serves both on
its ``/metrics`` and adds the ``model_name`` label (its served name) that vLLM's carry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
ERROR_BUCKETS_TOKENS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
RATIO_BUCKETS = (0.125, 0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 4.0, 8.0)

# vLLM's buckets (vllm/v1/metrics/loggers.py), so its dashboards' quantiles read the same.
VLLM_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                       7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                      10.0, 20.0, 40.0, 80.0)
VLLM_REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                          120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
VLLM_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
#: vLLM's 1-2-5 series (it stops at the context length; here at the max_tokens limit).
VLLM_TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5) if m * 10**e <= 1_000_000)
#: vLLM's finished_reason label values, by ALISE's finish reason.
VLLM_FINISH_REASONS = {"stop": "stop", "length": "length", "aborted": "abort"}
#: Jobs whose last token time is kept for the inter-token latency. A job is dropped when it
#: finishes; one cancelled is forgotten once this many newer jobs have produced tokens.
MAX_TRACKED_JOBS = 65_536


#: How long a scrape from the exporter's thread waits for the service's event loop to read
#: its state (a loop stuck that long fails the scrape, which is what a monitor should see).
STATE_READ_TIMEOUT_S = 5.0


class StateCollector:
    """Gauges computed at scrape time from ``read()``: [(name, help, labels, samples)];
    ``derive``, given the same rows, yields further families (vLLM's names for them).

    With ``loop``, ``read`` runs on that event loop whatever thread scrapes (the HTTP
    exporter's own): the state it reads (the scheduler core's jobs and worker views) is changed
    on the loop, and walking a dict while the loop resizes it raises."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, list[str], list[tuple[list[str], float]]]]],
                 derive: Callable[[list], Iterable] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self._read = read
        self._derive = derive
        self._loop = loop

    def _rows(self) -> list:
        loop = self._loop
        if loop is None or not loop.is_running() or running_loop() is loop:
            return list(self._read())
        done: concurrent.futures.Future = concurrent.futures.Future()

        def read() -> None:
            try:
                done.set_result(list(self._read()))
            except BaseException as exc:  # handed to the scraping thread, which raises it
                done.set_exception(exc)

        loop.call_soon_threadsafe(read)
        return done.result(timeout=STATE_READ_TIMEOUT_S)

    def collect(self):
        rows = self._rows()
        for name, documentation, labels, samples in rows:
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for label_values, value in samples:
                family.add_metric(label_values, value)
            yield family
        if self._derive is not None:
            yield from self._derive(rows)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop running on this thread, or None (built outside one: nothing changes the state
    a read walks while it walks it)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def vllm_state(rows: list) -> Iterable:
    """vLLM's scheduler-state families from the engine's own gauges: running (in a worker's
    batch), waiting (queued, or paused after a preemption: vLLM's waiting queue holds its
    preempted requests too), waiting by reason (all of them wait for capacity: ALISE defers
    none for a LoRA budget, a KV transfer or a grammar, vLLM's ``deferred``), KV cache usage
    (device blocks used over all workers' blocks, 0 to 1), preemptions since start, and the
    prefix cache's queries and hits (tokens the admits gave workers, and those of them found
    cached: vLLM counts a lookup's tokens, a preempted request's output included, the same way)."""
    values = {name: samples for name, _, _, samples in rows}
    jobs = {labels[0]: value for labels, value in values.get("alise_jobs", [])}
    waiting = sum(value for _, value in values.get("alise_queue_waiting", []))
    num_waiting = waiting + jobs.get("paused", 0)
    prefill = {labels[0]: value for labels, value in values.get("alise_prefill_tokens", [])}
    device = [(labels[2], value) for labels, value in values.get("alise_kv_blocks", []) if labels[1] == "device"]
    total = sum(value for _, value in device)
    used = sum(value for state, value in device if state == "used")
    for name, documentation, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", jobs.get("running", 0)),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", used / total if total else 0.0)):
        yield GaugeMetricFamily(name, documentation, value=value)
    by_reason = GaugeMetricFamily("vllm:num_requests_waiting_by_reason", "Number of waiting requests by reason. "
                                  "Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = "
                                  "deferred by transient constraints (none in ALISE). Sum of all reasons equals "
                                  "vllm:num_requests_waiting.", labels=["reason"])
    by_reason.add_metric(["capacity"], num_waiting)
    by_reason.add_metric(["deferred"], 0)
    yield by_reason
    preemptions = sum(value for _, value in values.get("alise_preemptions", []))
    yield CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                              value=preemptions)
    yield CounterMetricFamily("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                              "queried tokens.", value=prefill.get("admitted", 0))
    yield CounterMetricFamily("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
                              "tokens.", value=prefill.get("cached", 0))


class VllmRequestMetrics:
    """vLLM's per-request families (the names of vllm/v1/metrics/loggers.py), in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["finished_reason"], registry=r)
        for reason in VLLM_FINISH_REASONS.values():
            self.success.labels(reason)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              buckets=VLLM_TTFT_BUCKETS_S, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             buckets=VLLM_ITL_BUCKETS_S, registry=r)
        self.request_tpot = Histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.",
                                      buckets=VLLM_ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             buckets=VLLM_REQUEST_BUCKETS_S, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.",
                               buckets=VLLM_REQUEST_BUCKETS_S, registry=r)
        self.inference = Histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.",
                                   buckets=VLLM_REQUEST_BUCKETS_S, registry=r)
        self.prefill = Histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.",
                                 buckets=VLLM_REQUEST_BUCKETS_S, registry=r)
        self.decode = Histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.",
                                buckets=VLLM_REQUEST_BUCKETS_S, registry=r)
        self.prompt_tokens_cached = Counter("vllm:prompt_tokens_cached",
                                            "Number of cached prompt tokens (local + external).", registry=r)
        self.prompt_tokens_by_source = Counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                                               ["source"], registry=r)
        for source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
            self.prompt_tokens_by_source.labels(source)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               buckets=VLLM_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.",
                                                   buckets=VLLM_TOKEN_BUCKETS, registry=r)
        self.max_tokens = Histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                    buckets=VLLM_TOKEN_BUCKETS, registry=r)

    def observe_prompt(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """A request's prompt, once its prefill is done: ``num_cached_tokens`` of it were read
        from a worker's prefix cache, the rest computed (no KV comes from another instance)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.prompt_tokens_cached.inc(num_cached_tokens)
        self.prompt_tokens_by_source.labels("local_cache_hit").inc(num_cached_tokens)
        self.prompt_tokens_by_source.labels("local_compute").inc(num_prompt_tokens - num_cached_tokens)

    def observe_finished(self, reason: str, e2e_s: float, prompt_tokens: int, generation_tokens: int,
                         max_tokens: int | None = None) -> None:
        """One request that ended with ``reason`` (an ALISE finish reason)."""
        self.success.labels(VLLM_FINISH_REASONS.get(reason, reason)).inc()
        self.e2e.observe(e2e_s)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        if max_tokens is not None:
            self.max_tokens.observe(max_tokens)

    def observe_phases(self, job) -> None:
        """A finished job's phases, as vLLM splits a request (its ``FinishedRequestStats``), on
        the scheduler's clock: queue = arrival to first scheduled; prefill = first scheduled to
        first token; decode = first token to the last; inference = first scheduled to the last
        token (a preemption's pause counts in the phase it falls in); time per output token =
        the decode over the tokens after the first (0 for a one-token request)."""
        if job.scheduled_s is None or job.first_token_s is None or job.finish_s is None:
            return
        decode_s = job.finish_s - job.first_token_s
        self.queue.observe(job.scheduled_s - job.arrival_s)
        self.prefill.observe(job.first_token_s - job.scheduled_s)
        self.decode.observe(decode_s)
        self.inference.observe(job.finish_s - job.scheduled_s)
        n = job.num_output_tokens
        self.request_tpot.observe(decode_s / (n - 1) if n > 1 else 0.0)


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
    """The scheduler's families; ``record_tokens`` and ``record_finish`` are the client
    streams' two event hooks (one per token event, one per finished job), called off the
    engine loop (``alise.scheduler.streams``)."""

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
        self.prediction_ratio = Histogram("alise_prediction_ratio",
                                          "Predicted over true output length of finished requests",
                                          buckets=RATIO_BUCKETS, registry=r)
        self.step = Histogram("alise_step_seconds", "Worker step duration", ["worker"],
                              buckets=TOKEN_TIME_BUCKETS_S, registry=r)
        self.vllm = VllmRequestMetrics(r)
        self.iteration_tokens = Histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per "
                                          "engine_step (here: tokens a worker's step fed its model).",
                                          buckets=VLLM_ITERATION_TOKEN_BUCKETS, registry=r)
        #: Set by the scheduler to read its outbox: what a SIGKILL of the scheduler would lose.
        self.observations_buffered = Gauge("alise_scheduler_observations_buffered",
                                           "Finished requests' observations the predictor has not taken yet",
                                           registry=r)
        #: job id -> when its last tokens came (least recently updated first).
        self._last_token_s: OrderedDict[str, float] = OrderedDict()

    def watch(self, read, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Families read at scrape time by ``read``, on ``loop`` where given (see StateCollector)."""
        self.registry.register(StateCollector(read, derive=vllm_state, loop=loop))

    def exposition(self) -> str:
        """Every family in Prometheus' text format (what ``GetMetrics`` answers)."""
        return generate_latest(self.registry).decode()

    def record_tokens(self, job, index: int, num_tokens: int, now_s: float) -> None:
        """Tokens ``index`` .. ``index + num_tokens - 1`` of ``job``, reported at ``now_s``."""
        self.tokens.inc(num_tokens)
        v = self.vllm
        v.generation_tokens.inc(num_tokens)
        last = self._last_token_s.pop(job.job_id, None)
        if last is not None:
            v.itl.observe(now_s - last)
        elif index == 0:  # its first tokens (not an adopted or resumed job's)
            # The prefill that gave this token read its shared tokens from a prefix cache (its
            # admit's hit; a resume after a drop recomputed everything and left 0).
            v.observe_prompt(job.num_prompt_tokens, min(job.num_shared_tokens, job.num_prompt_tokens))
            v.ttft.observe((job.first_token_s or now_s) - job.arrival_s)
        self._last_token_s[job.job_id] = now_s
        if len(self._last_token_s) > MAX_TRACKED_JOBS:
            self._last_token_s.popitem(last=False)

    def record_finish(self, job) -> None:
        self.requests.labels("finished").inc()
        self._last_token_s.pop(job.job_id, None)
        if job.first_token_s is None or job.finish_s is None:
            return
        self.ttft.observe(job.first_token_s - job.arrival_s)
        self.e2e.observe(job.finish_s - job.arrival_s)
        if job.num_output_tokens > 1:
            self.tpot.observe((job.finish_s - job.first_token_s) / (job.num_output_tokens - 1))
        if job.estimate is not None:
            self.prediction_error.observe(abs(job.estimate.mean - job.num_output_tokens))
            self.prediction_ratio.observe(job.estimate.mean / max(1, job.num_output_tokens))
        reason = job.finish_reason.value if job.finish_reason is not None else "stop"
        self.vllm.observe_finished(reason, job.finish_s - job.arrival_s, job.num_prompt_tokens,
                                   job.num_output_tokens, job.sampling.max_tokens)
        self.vllm.observe_phases(job)

    def record_step(self, worker_id: str, report) -> None:
        """A worker's step that ran (``StepReport``): its time, and the tokens it fed (each
        chunk's, and one per other sequence: a decode)."""
        self.step.labels(worker_id).observe(report.step_duration_s)
        chunked = sum(n for _, n in report.chunks)
        self.iteration_tokens.observe(chunked + report.num_seqs - len(report.chunks))

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
