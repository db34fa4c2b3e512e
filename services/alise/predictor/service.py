"""``alise.v1.PredictorService`` over grpc.aio: the one place protobuf meets the predictor.

Requests are registered with *raw* deserialisation and parsed here, so a malformed message
(proto3 rejects strings that are not UTF-8 at parse time) becomes a readable
``INVALID_ARGUMENT`` instead of grpc's generic deserialisation failure, and in ``Observe``
only the bad message is rejected, not the stream.

Errors: empty prompt list, empty prompt (named by index), too many prompts, undecodable
request -> ``INVALID_ARGUMENT``; a failed batch -> ``INTERNAL``; shutting down ->
``UNAVAILABLE``. A prompt longer than the encoder's window is truncated and listed in
``PredictResponse.truncated``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from prometheus_client import CollectorRegistry, Counter, Histogram

from alise.common.grpc_server import ServingStatus, add_health_and_reflection, create_server
from alise.common.metrics import LATENCY_BUCKETS_S, StateCollector, serve_metrics
from alise.common.security import AuthInterceptor, bind_port
from alise.predictor.config import PredictorConfig
from alise.predictor.encoder import Encoder
from alise.predictor.runtime import PredictorRuntime, ShuttingDown
from alise.v1 import common_pb2, predictor_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name


def _parse(message_type, data: bytes):
    message = message_type()
    message.ParseFromString(data)
    return message


class PredictorServicer:
    """RPC handlers; holds the runtime by composition."""

    def __init__(self, runtime: PredictorRuntime) -> None:
        self.runtime = runtime
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
        try:
            with self.predict_seconds.time():
                result = await self.runtime.predict(prompts)
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
        return predictor_pb2.PredictResponse(predictions=predictions, truncated=result.truncated)

    async def observe(self, request_iterator, context: grpc.aio.ServicerContext):
        accepted = rejected = 0
        batch: list[tuple[str, int, str]] = []

        async def flush() -> None:
            nonlocal accepted
            if batch:
                await self.runtime.observe([b[0] for b in batch], [b[1] for b in batch],
                                           [b[2] for b in batch])
                accepted += len(batch)
                batch.clear()

        async for data in request_iterator:
            try:
                obs = _parse(predictor_pb2.Observation, data)
            except DecodeError:
                rejected += 1
                continue
            if not obs.prompt.strip() or obs.output_tokens < 0:
                rejected += 1
                continue
            batch.append((obs.prompt, obs.output_tokens, obs.model))
            if len(batch) >= self.runtime.config.max_batch_prompts:
                await flush()
        await flush()
        if rejected:
            logger.info("observe stream: %d accepted, %d rejected", accepted, rejected)
        self.observations.labels("accepted").inc(accepted)
        self.observations.labels("rejected").inc(rejected)
        return predictor_pb2.ObserveResponse(num_accepted=accepted, num_rejected=rejected)

    async def get_stats(self, request_bytes: bytes, context: grpc.aio.ServicerContext):
        rt = self.runtime
        return predictor_pb2.PredictorStats(
            num_entries=rt.history.num_prompts,
            index_type=rt.history.index.index_type,
            encoder=rt.encoder.name,
            embedding_dim=rt.encoder.dim,
            num_predictions=rt.num_predictions,
            num_observations=rt.num_observations,
            mean_abs_error=rt.mean_abs_error,
            bucket_edges=list(rt.config.estimator.bucket_edges),
            head_fitted_at=rt.estimator.fitted_at,
            head_num_samples=rt.estimator.num_fit_samples,
        )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        serialize = lambda m: m.SerializeToString()  # noqa: E731
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Predict": grpc.unary_unary_rpc_method_handler(self.predict, response_serializer=serialize),
            "Observe": grpc.stream_unary_rpc_method_handler(self.observe, response_serializer=serialize),
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
