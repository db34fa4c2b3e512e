"""``alise.v1.PredictorService`` over grpc.aio: the one place protobuf meets the predictor.

Requests are registered with *raw* deserialisation and parsed here, so a malformed message
(proto3 rejects strings that are not UTF-8 at parse time) becomes a readable
``INVALID_ARGUMENT`` instead of grpc's generic deserialisation failure, and in ``Observe``
only the bad message is rejected, not the stream.

``Observe`` is a long-lived bidirectional stream: messages are read into a bounded queue
(so the sender is held back by flow control, not buffered here), taken in batches of what
has arrived (at most ``max_batch_prompts``, at most ``max_observations_per_s``), and each
batch is answered once it is durable (see ``ObserveResponse`` in the proto).

Errors: empty prompt list, empty prompt (named by index), too many prompts, contexts not one
per prompt, a negative earlier length, undecodable request -> ``INVALID_ARGUMENT``; a failed
batch -> ``INTERNAL``; shutting down, or observations the log cannot take (a full disk: none
of the batch is taken) -> ``UNAVAILABLE``. A prompt longer than the encoder's window is truncated and listed in
``PredictResponse.truncated``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Histogram

from alise.common.grpc_server import ServingStatus, add_health_and_reflection, create_server
from alise.common.logs import LogLimiter
from alise.common.metrics import LATENCY_BUCKETS_S, StateCollector, serve_metrics
from alise.common.security import AuthInterceptor, bind_port
from alise.predictor.config import PredictorConfig
from alise.predictor.context import PromptContext
from alise.predictor.encoder import Encoder
from alise.predictor.runtime import ObservationIn, PredictorRuntime, ShuttingDown
from alise.v1 import common_pb2, predictor_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name


def _parse(message_type, data: bytes):
    message = message_type()
    message.ParseFromString(data)
    return message


class _RateLimit:
    """A token bucket: ``take(n)`` waits until ``n`` observations fit ``rate`` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= min(n, self.burst):
                self._tokens -= n
                return
            await asyncio.sleep((min(n, self.burst) - self._tokens) / self.rate)


async def _read_into(request_iterator, queue: asyncio.Queue) -> None:
    """Copies a request stream into a bounded queue (so the stream is read only as fast as
    it is handled), then ``None``."""
    try:
        async for data in request_iterator:
            await queue.put(data)
    except Exception as exc:  # a broken stream ends like a closed one
        logger.debug("observe stream ended: %s", exc)
    await queue.put(None)


async def _next_batch(queue: asyncio.Queue, max_items: int) -> tuple[list[bytes], bool]:
    """The next message and whatever else is already waiting; True when the stream ended."""
    first = await queue.get()
    if first is None:
        return [], True
    batch = [first]
    while len(batch) < max_items and not queue.empty():
        item = queue.get_nowait()
        if item is None:
            return batch, True
        batch.append(item)
    return batch, False


def _parse_observations(batch: list[bytes]) -> tuple[list[ObservationIn], list[int], int, int]:
    """(valid observations, their sequences, number rejected: undecodable, negative length,
    or neither a prediction id nor a prompt; the highest sequence seen)."""
    items, sequences, rejected, highest = [], [], 0, 0
    for data in batch:
        try:
            obs = _parse(predictor_pb2.Observation, data)
        except DecodeError:
            rejected += 1
            continue
        highest = max(highest, obs.sequence)
        if obs.output_tokens < 0 or not (obs.prediction_id or obs.prompt.strip()):
            rejected += 1
            continue
        dedup = f"{obs.sender}:{obs.sequence}" if obs.sender else ""
        items.append(ObservationIn(obs.output_tokens, obs.model, obs.prediction_id,
                                   obs.prompt if obs.prompt.strip() else "", dedup))
        sequences.append(obs.sequence)
    return items, sequences, rejected, highest


def _contexts(request, num_prompts: int) -> tuple[list[PromptContext] | None, str]:
    """The request's contexts (None: none given) or what is wrong with them."""
    if not request.contexts:
        return None, ""
    if len(request.contexts) != num_prompts:
        return None, (f"contexts: {len(request.contexts)} given for {num_prompts} prompts "
                      "(give one per prompt, or none)")
    out = []
    for i, c in enumerate(request.contexts):
        if any(n < 0 for n in c.previous_output_tokens):
            return None, f"contexts[{i}].previous_output_tokens has a negative length"
        out.append(PromptContext(tuple(c.previous_output_tokens), c.query if c.query.strip() else ""))
    return out, ""


class PredictorServicer:
    """RPC handlers; holds the runtime by composition."""

    def __init__(self, runtime: PredictorRuntime) -> None:
        self.runtime = runtime
        #: Observe batches the log could not take, said at most twice a second.
        self._unwritten = LogLimiter(logger)
        self.registry = CollectorRegistry()
        self.predict_seconds = Histogram("alise_predictor_predict_seconds", "Predict RPC latency",
                                         buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.prompts = Counter("alise_predictor_prompts", "Prompts predicted", registry=self.registry)
        self.observations = Counter("alise_predictor_observations", "Observations by outcome",
                                    ["outcome"], registry=self.registry)
        self.registry.register(StateCollector(lambda: [
            ("alise_predictor_history_prompts", "Prompts in the history", [],
             [([], runtime.history.num_prompts)])]))

    async def predict(self, request_bytes: bytes, context: grpc.aio.ServicerContext):
        try:
            request = _parse(predictor_pb2.PredictRequest, request_bytes)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "PredictRequest could not be decoded (prompts must be valid UTF-8)")
        prompts = list(request.prompts)
        limit = self.runtime.config.max_prompts_per_request
        if not prompts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompts must not be empty")
        if len(prompts) > limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"too many prompts: {len(prompts)} > max_prompts_per_request {limit}")
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}] is empty")
        contexts, problem = _contexts(request, len(prompts))
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            with self.predict_seconds.time():
                result = await self.runtime.predict(prompts, contexts)
            self.prompts.inc(len(prompts))
        except ShuttingDown as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"prediction failed: {exc}")
        est = result.estimates
        predictions = [
            common_pb2.LengthPrediction(
                mean=est.mean[i], p50=est.p50[i], p90=est.p90[i],
                bucket_probs=est.bucket_probs[i].tolist(), source=est.source[i],
                top_similarity=est.top_similarity[i],
            )
            for i in range(len(prompts))
        ]
        return predictor_pb2.PredictResponse(predictions=predictions, truncated=result.truncated,
                                             prediction_ids=result.prediction_ids)

    async def observe(self, request_iterator, context: grpc.aio.ServicerContext):
        """A long-lived stream: reads observations in batches (at most ``max_batch_prompts``,
        at most ``max_observations_per_s``), answers each batch once it is durable."""
        config = self.runtime.config
        queue: asyncio.Queue = asyncio.Queue(maxsize=config.max_batch_prompts)
        reader = asyncio.create_task(_read_into(request_iterator, queue))
        limit = _RateLimit(config.max_observations_per_s, burst=config.max_batch_prompts)
        response = predictor_pb2.ObserveResponse()
        try:
            ended = False
            while not ended:
                batch, ended = await _next_batch(queue, config.max_batch_prompts)
                if not batch:
                    break
                await limit.take(len(batch))
                items, sequences, num_rejected, highest = _parse_observations(batch)
                outcome = await self.runtime.observe(items)
                response.num_accepted += outcome.num_accepted
                response.num_rejected += num_rejected
                response.durable_sequence = max(response.durable_sequence, highest)
                del response.unknown_sequences[:]
                response.unknown_sequences.extend(sequences[i] for i in outcome.unknown)
                self.observations.labels("accepted").inc(outcome.num_accepted)
                self.observations.labels("rejected").inc(num_rejected)
                self.observations.labels("unknown").inc(len(outcome.unknown))
                yield response
        except ShuttingDown as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except OSError as exc:  # the log cannot be written (a full disk): nothing was taken
            self._unwritten.log(logging.WARNING, "observations not taken: cannot write the log (%s); "
                                "their sender sends them again", exc.strerror or exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"observations not durable: {exc.strerror or exc}")
        except (RuntimeError, ValueError) as exc:  # the sender resends what is unsettled
            logger.exception("observe batch failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"observation failed: {exc}")
        finally:
            reader.cancel()
        if response.num_rejected:
            logger.info("observe stream: %d accepted, %d rejected", response.num_accepted,
                        response.num_rejected)

    async def get_stats(self, request_bytes: bytes, context: grpc.aio.ServicerContext):
        rt = self.runtime
        return predictor_pb2.PredictorStats(
            num_entries=rt.history.num_prompts,
            index_type=rt.history.index.index_type,
            encoder=rt.encoder.name,
            embedding_dim=rt.encoder.dim,
            num_predictions=rt.num_predictions,
            num_observations=rt.num_observations,
            history_observations=rt.history.num_observations,
            mean_abs_error=rt.mean_abs_error,
            bucket_edges=list(rt.config.estimator.bucket_edges),
            head_fitted_at=rt.estimator.fitted_at,
            head_num_samples=rt.estimator.num_fit_samples,
            num_logged=rt.wal.num_logged if rt.wal is not None else 0,
            last_snapshot_at=rt.last_snapshot_at,
        )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        serialize = lambda m: m.SerializeToString()  # noqa: E731
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Predict": grpc.unary_unary_rpc_method_handler(self.predict, response_serializer=serialize),
            "Observe": grpc.stream_stream_rpc_method_handler(self.observe, response_serializer=serialize),
            "GetStats": grpc.unary_unary_rpc_method_handler(self.get_stats, response_serializer=serialize),
        })


@dataclass
class PredictorServer:
    """A running predictor: the grpc server, its bound port, runtime and health."""

    server: grpc.aio.Server
    port: int
    runtime: PredictorRuntime
    health: ServingStatus
    metrics_port: int = 0

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING, finish in-flight RPCs, stop tasks, final snapshot."""
        await self.health.set(False)
        await self.server.stop(self.runtime.config.drain_grace_s if grace_s is None else grace_s)
        await self.runtime.close()


async def start_predictor_server(
    config: PredictorConfig, *, encoder: Encoder | None = None
) -> PredictorServer:
    """Loads (or bootstraps) the history, fits, and starts serving on ``config.address``.

    ``encoder`` lets tests and in-process clusters share one loaded model. Raises
    ``SnapshotError`` when ``config.index_dir`` holds a corrupt or mismatched index.
    """
    runtime = await PredictorRuntime.create(config, encoder)
    server = create_server(interceptors=[AuthInterceptor(config.security)])
    servicer = PredictorServicer(runtime)
    server.add_generic_rpc_handlers((servicer.generic_handler(),))
    health = await add_health_and_reflection(server, [SERVICE_NAME])
    port = bind_port(server, config.address, config.security)
    metrics_port = serve_metrics(servicer.registry, config.metrics_address) if config.metrics_address else 0
    await server.start()
    runtime.start()
    logger.info("predictor serving on port %d (%d prompts, index %s)", port,
                runtime.history.num_prompts, runtime.history.index.index_type)
    return PredictorServer(server, port, runtime, health, metrics_port)
