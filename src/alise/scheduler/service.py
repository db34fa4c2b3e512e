"""The scheduler service: the client front door and the workers' rendezvous.

``SchedulerService.Generate`` checks and tokenizes a request (``alise.scheduler.request_checks``),
queues the job at once with a prior length estimate (re-keyed when the predictor's arrives, so
the predictor's latency is not in the time to first token) and streams its tokens back with
text deltas, detokenized on the handler's own task, or, with ``streams_process``, by the
client front (``alise.scheduler.front``), a process of its own that holds the client listener
and relays its calls here. ``WorkerService.Connect``
(``alise.scheduler.worker_service``) is the stream each worker holds: plans (one or two ahead)
and aborts out, reports in. ``start_scheduler`` puts the parts together: the engine loop
(``alise.scheduler.engine``), the client streams (``alise.scheduler.streams``), status
(``alise.scheduler.status``) and the two listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

import grpc

from alise.common import grpc_server, wire
from alise.common.logs import LogLimiter, preview, request_id_var
from alise.common.metrics import SchedulerMetrics, serve_metrics
from alise.common.security import bind_port
from alise.core.build import make_core
from alise.core.job import Job
from alise.core.latency_model import LatencyModel
from alise.modelinfo.served import ModelInfo, load_model_info
from alise.predictor.context import PromptContext
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.detokenizer import TextDeltas
from alise.scheduler.engine import SchedulerEngine
from alise.scheduler.estimates import LengthEstimator
from alise.scheduler.front_link import FrontProcess, RelayedStatus
from alise.scheduler.listeners import SCHEDULER_SERVICE, WORKER_SERVICE, make_client_listener, make_worker_listener
from alise.scheduler.messages import Inbox, NewEstimate
from alise.scheduler.quarantine import Quarantine
from alise.scheduler.request_checks import GenerateChecks, generate_precheck
from alise.scheduler.status import EngineStatus
from alise.scheduler.streams import JobFailed, JobStream, StreamClosing, Streams
from alise.scheduler.worker_service import WorkerServicer
from alise.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

#: grpc.health.v1 service name that is NOT_SERVING while the scheduler runs on fallback estimates.
PREDICTOR_HEALTH_NAME = "alise.scheduler.predictor"
GENERATE_METHOD = "/alise.v1.SchedulerService/Generate"


class RequestError(Exception):
    """A refused or failed request. ``resumable``: the client may resume the stream (same
    request id, the tokens it has) once a scheduler is back; sent as ``alise-resumable``
    trailing metadata on UNAVAILABLE, which is otherwise resumable only when it comes from
    the transport (no scheduler answered)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None,
                 resumable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s
        self.resumable = resumable

    async def abort(self, context) -> None:
        trailing = []
        if self.retry_after_s is not None:
            trailing.append(("retry-after-ms", str(int(self.retry_after_s * 1000))))
        if self.code is grpc.StatusCode.UNAVAILABLE:
            trailing.append(("alise-resumable", "1" if self.resumable else "0"))
        await context.abort(self.code, str(self), trailing_metadata=tuple(trailing))


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, config: SchedulerConfig, info: ModelInfo, engine: SchedulerEngine, streams: Streams,
                 status: EngineStatus, estimator: LengthEstimator, quarantine: Quarantine | None = None) -> None:
        self.config = config
        self.info = info
        self.engine = engine
        self.streams = streams
        self.status = status
        self.estimator = estimator
        self.quarantine = quarantine or Quarantine(None)
        self.checks = GenerateChecks(info, default_max_tokens=config.default_max_tokens,
                                     max_prompt_chars=config.max_prompt_chars)
        self.accepting = True
        self._predicting: set[asyncio.Future] = set()
        self._refusals = LogLimiter(logger)

    async def Generate(self, request, context):
        texts = TextDeltas(self.info.tokenizer, request)
        async with contextlib.aclosing(self.responses(request, context)) as responses:
            async for response in responses:
                yield texts.fill(response)

    async def responses(self, request, context):
        """Generate's responses without their text: the writer of the call fills it in
        (``Generate`` here, or the client front, ``alise.scheduler.front``)."""
        try:
            job, prompt_context = await self._make_job(request)
            request_id_var.set(job.job_id)  # checked: only now may it go into log lines
            if (refusal := self.quarantine.refusal(job)) is not None:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, refusal)
            if job.output_token_ids:  # a resumed stream: its job may be on a returning worker
                await self.streams.await_adoption(job.job_id)
            stream = self._open(job)
        except RequestError as exc:
            self._refusals.log(logging.INFO, "refused: %s %s (request id %s)", exc.code.name, exc,
                               preview(request.request_id))
            await exc.abort(context)
        if stream.job is job:
            logger.info("queued: %d prompt tokens, max_tokens %d%s", job.num_prompt_tokens,
                        job.sampling.max_tokens, f", resumed after {job.num_output_tokens} tokens"
                        if job.num_output_tokens else "")
            # Not awaited: bounded by the predictor's deadline, and its outcome (an estimate, or
            # a failure that marks the predictor degraded) matters even if the job ends first.
            self._predicting.add(predicting := asyncio.ensure_future(self._predict(job, prompt_context)))
            predicting.add_done_callback(self._predicting.discard)
        job = stream.job  # an adopted job whose stream this request resumes
        # Tells the client its request is taken: from here on, a broken stream is resumable.
        await context.send_initial_metadata((("alise-accepted", "1"),))
        try:
            async for response in self._relay(stream, job):
                yield response
            logger.info("finished: %d tokens (%s), ttft %.3f s, e2e %.3f s, %d preemptions",
                        job.num_output_tokens, job.finish_reason.value if job.finish_reason else "?",
                        (job.first_token_s or job.arrival_s) - job.arrival_s,
                        (job.finish_s or job.arrival_s) - job.arrival_s, job.num_preemptions)
        except RequestError as exc:
            logger.warning("failed: %s %s", exc.code.name, exc)
            await exc.abort(context)
        finally:
            # Client gone, deadline passed or cancelled: free the job's memory now.
            if not job.is_finished:
                self.streams.close(job.job_id)

    async def _predict(self, job: Job, context: PromptContext | None) -> None:
        """Asks for the job's length estimate (with the conversation it continues, when the
        request gave it); the engine re-keys the queued job with it."""
        estimate = await self.estimator.estimate(job.prompt_text, job.num_prompt_tokens, context)
        if estimate != job.estimate and not job.is_finished:
            logger.debug("estimate %.0f tokens (%s)", estimate.mean, estimate.source)
            self.engine.inbox.post(NewEstimate(job.job_id, estimate))

    def _open(self, job: Job) -> JobStream:
        try:
            return self.streams.open(job)
        except OverflowError as exc:
            self.engine.metrics.requests.labels("rejected_busy").inc()
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server busy: {exc}; retry in a few seconds",
                               retry_after_s=2.0) from None
        except KeyError as exc:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, str(exc.args[0])) from None
        except StreamClosing as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry", resumable=True) from None
        except JobFailed as exc:
            raise RequestError(getattr(grpc.StatusCode, exc.code), str(exc), resumable=exc.resumable) from None

    async def _relay(self, stream: JobStream, job: Job):
        """The job's responses, on this handler's task: the streams wake it once the engine
        loop's plans are out."""
        first = True
        while True:
            for item in await stream.next_batch():
                if isinstance(item, JobFailed):
                    raise RequestError(getattr(grpc.StatusCode, item.code), str(item),
                                       resumable=item.resumable)
                response = scheduler_pb2.GenerateResponse(
                    request_id=job.job_id, token_ids=item.token_ids, index=item.index)
                wire.logprobs_to_pb(item.logprobs, response.logprobs)
                if first:
                    first = False
                    response.prompt_tokens = job.num_prompt_tokens
                    if job.estimate is not None:
                        e = job.estimate
                        response.estimate.CopyFrom(common_pb2.LengthPrediction(
                            mean=e.mean, p50=e.p50, p90=e.p90, source=e.source))
                if item.finish_reason is not None:
                    response.finish_reason = wire.finish_to_pb(item.finish_reason)
                    response.usage.CopyFrom(self._usage(job))
                    yield response
                    return
                yield response

    def _usage(self, job: Job) -> common_pb2.Usage:
        end = job.finish_s or time.monotonic()
        return common_pb2.Usage(
            prompt_tokens=job.num_prompt_tokens, completion_tokens=job.num_output_tokens,
            ttft_s=(job.first_token_s or end) - job.arrival_s, e2e_s=end - job.arrival_s,
            queued_s=job.queued_s, num_preemptions=job.num_preemptions)

    async def _make_job(self, request) -> tuple[Job, PromptContext | None]:
        if self.engine.failure is not None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the scheduler failed and is restarting; retry",
                               resumable=True)
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the scheduler is draining", resumable=True)
        try:
            checked = await self.checks.check(request)
        except ValueError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        job = Job(checked.request_id, checked.token_ids, checked.sampling, arrival_s=time.monotonic(),
                  estimate=self.estimator.running_mean, output_token_ids=checked.resume_token_ids,
                  oracle_output_tokens=checked.oracle_output_tokens, prompt_text=checked.prompt_text)
        return job, checked.context

    async def GetStatus(self, request, context):
        snap = self.status.snapshot()
        workers = [scheduler_pb2.WorkerStatus(**w) for w in snap.pop("workers")]
        return scheduler_pb2.GetStatusResponse(
            workers=workers, predictor_state=self.estimator.state, model=self.info.name,
            max_model_len=self.info.max_model_len, **snap)

    async def GetMetrics(self, request, context):
        return scheduler_pb2.GetMetricsResponse(text=self.engine.metrics.exposition(), model=self.info.name)


@dataclass
class SchedulerServer:
    #: The client listener (SchedulerService), or the front process that holds it, and its port.
    server: grpc.aio.Server | FrontProcess
    port: int
    engine: SchedulerEngine
    streams: Streams
    status: EngineStatus
    servicer: SchedulerServicer
    health: grpc_server.ServingStatus
    #: The worker listener (WorkerService) and its port.
    worker_server: grpc.aio.Server
    worker_port: int
    metrics_port: int = 0
    job_log: object = None  # the open --job-log file, closed by stop()
    #: Set when the engine loop failed (the process should exit non-zero).
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Background tasks (the failure watcher, the cycle-time log, the predictor's warm-up),
    #: cancelled by stop().
    tasks: list[asyncio.Future] = field(default_factory=list)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drains: refuse new requests, let in-flight ones finish within ``grace_s`` (workers
        stay connected meanwhile), then fail the rest with UNAVAILABLE and stop. The listeners
        stop on every way out of here (a failed step of the drain, a cancelled stop): a
        listener left running outlives its event loop."""
        for task in self.tasks:
            task.cancel()
        self.servicer.accepting = False
        try:
            await self.health.set(False)
            deadline = time.monotonic() + grace_s
            while self.streams.num_live() and time.monotonic() < deadline and not self.failed.is_set():
                await asyncio.sleep(0.05)
            logger.info("drained (%d requests still in flight); stopping", self.streams.num_live())
            await self.engine.stop()
            await self.servicer.estimator.close()
        finally:
            await asyncio.gather(self.server.stop(1.0), self.worker_server.stop(1.0))
            if self.job_log is not None:
                self.job_log.close()
        logger.info("stopped")


async def start_scheduler(config: SchedulerConfig, *, predict=None, observe=None) -> SchedulerServer:
    info = await asyncio.to_thread(load_model_info, config.model, config.max_model_len)
    # Without a profile of its own, the scheduler adopts the first worker's (measured on its device).
    latency = LatencyModel.load(config.latency_profile) if config.latency_profile else LatencyModel()
    core = make_core(config.scheduling, latency)
    estimator = LengthEstimator(predict, observe, timeout_s=config.predictor_timeout_s)

    job_log = open(config.job_log, "a", encoding="utf-8", buffering=1) if config.job_log else None

    unwritten = LogLimiter(logger, per_s=0.1, burst=1)

    def on_finish(job: Job) -> None:
        estimator.observe(job.prompt_text, job.num_prompt_tokens, job.num_output_tokens, job.estimate)
        if job_log is not None:
            try:
                job_log.write(json.dumps(job_record(job)) + "\n")
            except OSError as exc:  # a full disk: the record is dropped, the job is not
                unwritten.log(logging.WARNING, "cannot write the job log %s (%s): records dropped",
                              config.job_log, exc.strerror or exc)

    failed = asyncio.Event()
    quarantine = Quarantine(config.state_dir or None)

    def on_failure(exc: BaseException) -> None:
        quarantine.record_crash(engine.suspects, exc)  # before the process exits
        failed.set()

    metrics = SchedulerMetrics()
    if observe is not None:
        metrics.observations_buffered.set_function(lambda: observe.num_buffered)
    inbox = Inbox()
    streams = Streams(inbox, metrics, max_queued=config.max_queued, on_finish=on_finish)
    engine = SchedulerEngine(core, latency, inbox, streams, max_wait_no_worker_s=config.max_wait_no_worker_s,
                             plans_ahead=config.scheduling.plans_ahead,
                             min_plans_ahead=config.scheduling.min_plans_ahead, on_failure=on_failure)
    status = EngineStatus(engine)
    metrics.forget_departed_workers(lambda: engine.links)
    servicer = SchedulerServicer(config, info, engine, streams, status, estimator, quarantine)
    health = (RelayedStatus if config.streams_process else grpc_server.ServingStatus)(
        [SCHEDULER_SERVICE, WORKER_SERVICE])
    await health.set(True)
    if predict is not None:
        await health.set_one(PREDICTOR_HEALTH_NAME, False)  # until the warm-up call answers
        estimator.on_state = lambda ok: asyncio.ensure_future(health.set_one(PREDICTOR_HEALTH_NAME, ok))
    worker_server = await make_worker_listener(config, WorkerServicer(engine, info), health)
    if config.streams_process:
        server = FrontProcess(servicer, health, on_lost=failed.set)
    else:
        server = await make_client_listener(config, servicer, health,
                                            prechecks={GENERATE_METHOD: generate_precheck(info.max_model_len)})
        port = bind_port(server, config.address, config.security, internal=False)
    worker_port = bind_port(worker_server, config.worker_listen_address, config.security)

    async def on_failed() -> None:
        await failed.wait()
        servicer.accepting = False
        await health.set(False)
    tasks = [asyncio.ensure_future(on_failed()), asyncio.ensure_future(status.run())]
    streams.start()
    engine.start()
    metrics_port = 0
    if config.metrics_address:
        metrics_port = serve_metrics(engine.metrics.registry, config.metrics_address)
    if config.streams_process:
        port = await server.start(config)
    else:
        await server.start()
    await worker_server.start()
    if predict is not None:
        # After listening: a predictor that is down must not keep clients and workers out.
        tasks.append(asyncio.ensure_future(_warm_up(estimator, health)))
    _log_listening(config, info, port, worker_port)
    return SchedulerServer(server=server, port=port, engine=engine, streams=streams, status=status,
                           servicer=servicer, health=health,
                           worker_server=worker_server, worker_port=worker_port, metrics_port=metrics_port,
                           job_log=job_log, failed=failed, tasks=tasks)


def _log_listening(config: SchedulerConfig, info: ModelInfo, port: int, worker_port: int) -> None:
    clients = f"{config.address.rsplit(':', 1)[0]}:{port}"
    workers = f"{config.worker_listen_address.rsplit(':', 1)[0]}:{worker_port}"
    logger.info("scheduler listening for clients on %s and for workers on %s (policy %s, model %s, "
                "context %d)", clients, workers, config.scheduling.policy, info.name, info.max_model_len)
    if not config.security.has_internal_credential:
        logger.warning("the worker listener %s is open: any process on this host can register as a "
                       "worker and read the prompts it is given; give the scheduler and its workers an "
                       "internal secret (--internal-secret-file or ALISE_INTERNAL_SECRET)", workers)


async def _warm_up(estimator: LengthEstimator, health: grpc_server.ServingStatus) -> None:
    await estimator.warm_up()
    await health.set_one(PREDICTOR_HEALTH_NAME, not estimator.is_degraded)


def job_record(job: Job) -> dict:
    """One finished job, as ``--job-log`` writes it (times in seconds from its arrival)."""
    est = job.estimate
    since = lambda t: None if t is None else round(t - job.arrival_s, 6)  # noqa: E731
    return dict(job_id=job.job_id, prompt_tokens=job.num_prompt_tokens, output_tokens=job.num_output_tokens,
                estimate=None if est is None else dict(mean=est.mean, p50=est.p50, p90=est.p90, source=est.source),
                ttft_s=since(job.first_token_s), e2e_s=since(job.finish_s), preemptions=job.num_preemptions,
                worker_id=job.worker_id)
