"""The worker process: one model replica that dials the scheduler.

It loads the model (``alise.worker.model.serving``: the one place torch comes in), serves
``grpc.health.v1`` on its own port (NOT_SERVING while loading or disconnected, SERVING while
attached to a scheduler), and holds the ``WorkerService.Connect`` stream. Plans arrive ahead of the
step the worker runs;
a step thread (``alise.worker.step_loop``) takes them one after another, each as soon as the
step before it is done, while the event loop reads plans and aborts off the stream and writes
reports back, so neither waits for the other. When the stream breaks, the worker drops its
jobs (the scheduler re-queues them) and reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from alise.client.channel import make_aio_channel
from alise.common import grpc_server, wire
from alise.common.metrics import WorkerMetrics, serve_metrics
from alise.core.commands import AbortJobs, Shutdown, StepPlan, StepReport, Welcome
from alise.core.latency_model import LatencyModel
from alise.modelinfo.identity import ModelIdentity
from alise.v1 import worker_pb2, worker_pb2_grpc
from alise.worker.config import WorkerConfig
from alise.worker.engine import WorkerEngine
from alise.worker.step_loop import StepLoop

logger = logging.getLogger(__name__)


class Worker:
    """One model replica. ``engine`` and ``identity`` given: serve that engine (a virtual
    worker over a latency model, for benchmarks) instead of loading ``config.model``."""

    def __init__(self, config: WorkerConfig, *, engine: WorkerEngine | None = None,
                 identity: ModelIdentity | None = None) -> None:
        self.config = config
        self.worker_id = config.resolved_worker_id
        self.engine = engine
        self.identity = identity
        #: Jobs kept after the last scheduler was lost, for the next one to adopt, and the
        #: scheduler_id they ran under (that of the session's welcome).
        self._held: list = []
        self._held_from = ""
        self._scheduler_id = ""
        self._free_cached_memory = None  # the loaded model's, after a failed step
        self.latency_model: LatencyModel | None = None
        self.health: grpc_server.ServingStatus | None = None
        self.health_port = 0
        self._health_server: grpc.aio.Server | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-step")
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()
        self.metrics = WorkerMetrics()
        #: Sums since the last log line: cycles, waiting for a plan, in the executor, and per
        #: kind of step ("decode": decode tokens only; "mixed": with prefill tokens) steps,
        #: forward + sampling seconds, prefill tokens, decode tokens.
        self._cycle = self._new_cycle_sums()
        self._cycle_logged_s = time.monotonic()
        self.log_cycle_times_s = 30.0
        self.metrics_port = 0
        self._step_log = None  # open file of config.step_log, written from the step thread
        self._step_log_lock = threading.Lock()

    async def start_health(self) -> None:
        if not self.config.health_address:
            return
        self._health_server = grpc_server.create_server()
        self.health = await grpc_server.add_health_and_reflection(self._health_server, [])
        await self.health.set(False)
        self.health_port = grpc_server.bind(self._health_server, self.config.health_address)
        await self._health_server.start()

    async def load(self) -> None:
        if self.engine is None:
            # Torch comes in here, with the model: the serving mechanism itself never needs it.
            if self.config.tensor_parallel_size > 1:
                from alise.worker.model.tp_serving import load_tp_served_model as load_served_model
            else:
                from alise.worker.model.serving import load_served_model

            loop = asyncio.get_running_loop()
            served = await loop.run_in_executor(self._executor, load_served_model, self.config)
            self.engine, self.identity, self.latency_model = served.engine, served.identity, served.latency_model
            self._free_cached_memory = served.free_cached_memory
        self._open_outputs()

    def _open_outputs(self) -> None:
        cfg = self.config
        self.metrics.watch(self._state_metrics)
        if cfg.step_log:
            self._step_log = open(cfg.step_log, "a", encoding="utf-8", buffering=1)  # closed in close()
        if cfg.metrics_address:
            self.metrics_port = serve_metrics(self.metrics.registry, cfg.metrics_address)

    def hello(self) -> worker_pb2.WorkerMessage:
        ident, cfg = self.identity, self.config
        return worker_pb2.WorkerMessage(hello=worker_pb2.WorkerHello(
            worker_id=self.worker_id, model=ident.name, device=ident.device,
            block_size=cfg.block_size, num_device_blocks=self.engine.allocator.num_blocks,
            num_host_blocks=self.engine.kv.num_host_blocks, max_model_len=self.engine.max_model_len,
            vocab_size=ident.vocab_size, block_bytes=ident.block_bytes, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=self.token_budget(), model_id=ident.model_id, weights_fingerprint=ident.weights,
            held_jobs=[wire.held_to_pb(job) for job in self._held], held_from_scheduler_id=self._held_from,
            prefix_caching=self.engine.kv.prefix_caching, kv_cache_dtype=cfg.kv_cache_dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            latency_profile_json=self.latency_model.to_json() if self.latency_model else ""))

    def token_budget(self) -> int:
        """The step's token budget this worker advertises: the configured one, but no more than
        its largest mixed-step graph where it has them (a step above it would run eagerly, at two
        to three times a decode step), and never under a full batch of decodes."""
        budget = self.config.token_budget
        graphs = getattr(getattr(self.engine.executor, "runner", None), "mixed_graphs", None)
        if graphs is not None and graphs.token_buckets:
            budget = min(budget, max(graphs.token_buckets))
        return max(budget, self.config.max_num_seqs)

    async def run(self) -> None:
        """Connects, serves plans, reconnects; returns after ``stop``.

        When the stream breaks (the scheduler died or the network failed), the worker keeps
        its jobs, paused, for ``orphan_ttl_s``: its next hello lists them, and a scheduler that
        does not know them (a restarted one) adopts them with their KV; one that does has them
        aborted. When the scheduler closes the stream itself, a step fails, or the worker
        stops, the jobs are dropped (the scheduler re-queues them)."""
        delay = self.config.reconnect_delay_s
        held_until = 0.0
        while not self._stopping.is_set():
            keep = True
            try:
                keep = await self._session()
                delay = self.config.reconnect_delay_s
            except grpc.aio.AioRpcError as exc:
                logger.warning("scheduler stream ended: %s %s", exc.code().name, exc.details())
            except wire.WireError as exc:
                logger.error("scheduler sent a plan this worker cannot read (%s); reconnecting", exc)
                keep = False
            except (grpc.RpcError, asyncio.InvalidStateError, ConnectionError) as exc:
                # The stream broke under a write (the scheduler went away mid-step).
                logger.warning("scheduler stream broke: %s: %s", type(exc).__name__, exc)
            finally:
                self.connected.clear()
                if self.health:
                    await self.health.set(False)
            if self._stopping.is_set():
                break
            if keep and self.engine.seqs and not self._held:
                self._held, self._held_from = self.engine.hold(), self._scheduler_id
                held_until = time.monotonic() + self.config.orphan_ttl_s
                logger.warning("lost the scheduler; keeping %d jobs for %g s for it to adopt",
                               len(self._held), self.config.orphan_ttl_s)
            elif not keep or (self._held and time.monotonic() > held_until):
                self._drop_held()
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
            # Kept jobs wait for a scheduler: retry often enough to be back before their clients.
            delay = min(delay * 2, 1.0 if self._held else 10.0)
        self._drop_held()

    def _drop_held(self) -> None:
        if self.engine is not None:
            self.engine.abort_all()
        self._held, self._held_from = [], ""

    async def _session(self) -> bool:
        """One connection; returns whether the jobs should be kept for the next one."""
        sec = self.config.security
        channel = make_aio_channel(self.config.scheduler_address, tls=sec.uses_tls or bool(sec.tls_ca),
                                   tls_ca=sec.tls_ca, tls_cert=sec.tls_cert, tls_key=sec.tls_key)
        async with channel:
            call = worker_pb2_grpc.WorkerServiceStub(channel).Connect(metadata=sec.internal_metadata())
            await call.write(self.hello())
            self._scheduler_id = ""
            self.engine.new_session()
            steps = StepLoop(self, asyncio.get_running_loop(), overlap=self.config.async_steps)
            read = asyncio.ensure_future(self._read(call, steps))
            write = asyncio.ensure_future(self._write(call, steps))
            ends = [read, write, asyncio.ensure_future(steps.failed.wait()),
                    asyncio.ensure_future(self._stopping.wait())]
            try:
                done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
                for task in (read, write):
                    if task in done and not task.cancelled() and task.exception() is not None:
                        raise task.exception()
            finally:
                for task in ends:
                    task.cancel()
                call.cancel()
                await steps.close()
                if steps.failed.is_set() and self._free_cached_memory is not None:
                    self._free_cached_memory()
            # Kept only when the stream just broke (EOF): the scheduler did not say goodbye, and
            # no step failed half-way. A read cancelled from outside is no EOF, and its
            # CancelledError must not end the worker's reconnect loop.
            return (read in done and not read.cancelled() and read.result() is None
                    and not steps.failed.is_set())

    async def _read(self, call, steps: StepLoop) -> Shutdown | None:
        """Plans and aborts off the stream, into the step thread's queues, until the scheduler
        closes the stream (its Shutdown) or the stream breaks (None)."""
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return None
            match wire.to_worker_from_pb(message):
                case Shutdown(reason) as shutdown:
                    logger.warning("scheduler closed the stream: %s", reason)
                    return shutdown
                case AbortJobs() as aborts:
                    steps.abort(aborts)
                case Welcome(scheduler_id):
                    logger.info("worker %s attached to %s", self.worker_id, self.config.scheduler_address)
                    self._scheduler_id = scheduler_id
                    self._held, self._held_from = [], ""  # the scheduler has them now (adopted or aborted)
                    self.connected.set()
                    if self.health:
                        await self.health.set(True)
                    steps.submit(StepPlan(step_id=0))  # its report tells the scheduler plans run here
                case StepPlan() as plan:
                    steps.submit(plan)

    async def _write(self, call, steps: StepLoop) -> None:
        while True:
            report = await steps.reports.get()
            await call.write(wire.report_to_pb(report))

    @staticmethod
    def _new_cycle_sums() -> dict:
        return dict(cycles=0, wait_s=0.0, execute_s=0.0,
                    decode=[0, 0.0, 0, 0], mixed=[0, 0.0, 0, 0])

    def count_cycle(self, wait_s: float, execute_s: float, report: StepReport) -> None:
        """Sums where the worker's time goes; logs them every ``log_cycle_times_s``."""
        c = self._cycle
        c["cycles"] += 1
        c["wait_s"] += wait_s
        c["execute_s"] += execute_s
        if report.step_duration_s > 0:
            kind = c["mixed"] if report.num_prefill_tokens else c["decode"]
            kind[0] += 1
            kind[1] += report.step_duration_s
            kind[2] += report.num_prefill_tokens
            kind[3] += report.num_decode_tokens
        now = time.monotonic()
        if now - self._cycle_logged_s < self.log_cycle_times_s:
            return
        n = c["cycles"]
        kinds = "; ".join(
            f"{name} steps {k[0]}, {1e3 * k[1] / k[0]:.1f} ms each ({k[2] / k[0]:.0f} prefill + "
            f"{k[3] / k[0]:.0f} decode tokens)" for name, k in (("decode", c["decode"]), ("mixed", c["mixed"]))
            if k[0])
        logger.info("worker %s, last %.0f s: %d cycles; per cycle: waiting for the plan %.1f ms, "
                    "executing %.1f ms; forward + sampling: %s", self.worker_id,
                    now - self._cycle_logged_s, n, 1e3 * c["wait_s"] / n, 1e3 * c["execute_s"] / n,
                    kinds or "no steps")
        self._cycle = self._new_cycle_sums()
        self._cycle_logged_s = now

    def execute(self, plan: StepPlan, waited_s: float | None = None) -> StepReport:
        """Runs one plan on the engine (in the step thread); ``waited_s``: how long it waited
        for this plan with jobs running (None: it had none)."""
        return self.record(self.engine.run(plan), waited_s)

    def record(self, report: StepReport, waited_s: float | None = None) -> StepReport:
        """A step's report into the metrics and the step log (``execute``'s, and that of an
        overlapped step, ``alise.worker.step_loop``, once its tokens are read)."""
        if waited_s is not None:
            self.metrics.plan_wait.observe(waited_s)
        if self._step_log is not None and report.step_duration_s > 0:
            self._log_step(report.step_id, report.step_duration_s, waited_s)
        m = self.metrics
        if report.step_duration_s > 0:
            m.step.observe(report.step_duration_s)
        m.tokens.labels("prefill").inc(report.num_prefill_tokens)
        m.tokens.labels("decode").inc(report.num_decode_tokens)
        for r in report.refused:
            m.refused.labels(r.command).inc()
        return report

    def step_failed(self) -> None:
        self.metrics.step_failures.inc()

    def _state_metrics(self):
        engine = self.engine
        used = engine.allocator.num_blocks - engine.allocator.num_free
        yield ("alise_worker_kv_blocks", "Device KV blocks", ["state"],
               [(["used"], used), (["free"], engine.allocator.num_free)])
        yield ("alise_worker_jobs", "Jobs on this worker", ["state"],
               [(["running"], engine.num_running), (["paused"], engine.num_paused)])
        yield ("alise_worker_connected", "1 while attached to a scheduler", [],
               [([], 1 if self.connected.is_set() else 0)])

    async def stop(self) -> None:
        self._stopping.set()
        if self._health_server is not None:
            await self._health_server.stop(0.5)

    def _log_step(self, step_id: int, seconds: float, waited_s: float | None) -> None:
        num_seqs, context, prefill_lens, prefill_starts = self.engine.last_step_shape
        line = json.dumps(dict(step=step_id, num_seqs=num_seqs, context=context, prefill_lens=prefill_lens,
                               prefill_starts=prefill_starts, seconds=round(seconds, 6),
                               end_s=round(time.monotonic(), 6),
                               waited_s=None if waited_s is None else round(waited_s, 6)))
        with self._step_log_lock:
            if self._step_log is not None:
                self._step_log.write(line + "\n")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._step_log_lock:
            if self._step_log is not None:
                self._step_log.close()
                self._step_log = None
