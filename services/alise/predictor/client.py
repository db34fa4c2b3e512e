"""A small async client for the scheduler: predict lengths, report finished requests.

Usage::

    client = PredictorClient("127.0.0.1:50053")
    estimates = await client.predict(["Write a haiku"], timeout_s=0.05)
    await client.observe("Write a haiku", output_tokens=21)
    await client.close()

Every method raises :class:`PredictorUnavailable` on any failure (timeout, connection,
server error), so the caller can fall back to its running mean and say so in its status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from alise.v1 import predictor_pb2, predictor_pb2_grpc


class PredictorUnavailable(RuntimeError):
    """The predictor could not answer; ``code`` is the gRPC status code when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LengthEstimate:
    """Predicted output tokens: ``mean``, median ``p50`` (the best single guess for ranking
    and MAE), ``p90``; ``source`` is "blend", "head", "knn" or "prior"."""

    mean: float
    p50: float
    p90: float
    source: str


class PredictorClient:
    def __init__(self, address: str, *, channel: grpc.aio.Channel | None = None) -> None:
        self.address = address
        self._channel = channel or grpc.aio.insecure_channel(address)
        self._stub = predictor_pb2_grpc.PredictorServiceStub(self._channel)

    async def predict(self, prompts: Sequence[str], timeout_s: float = 1.0) -> list[LengthEstimate]:
        """One estimate per prompt, in order."""
        try:
            response = await self._stub.Predict(
                predictor_pb2.PredictRequest(prompts=list(prompts)), timeout=timeout_s,
                wait_for_ready=True)  # a reconnecting channel gets the whole deadline
        except grpc.aio.AioRpcError as exc:
            raise PredictorUnavailable(f"Predict failed: {exc.code().name}: {exc.details()}",
                                       exc.code()) from exc
        return [LengthEstimate(p.mean, p.p50, p.p90, p.source) for p in response.predictions]

    async def observe(self, prompt: str, output_tokens: int, *, model: str = "",
                      timeout_s: float = 1.0) -> None:
        """Reports one finished request (``model`` empty = the predictor's served model)."""
        observation = predictor_pb2.Observation(prompt=prompt, output_tokens=output_tokens, model=model)
        try:
            response = await self._stub.Observe(iter([observation]), timeout=timeout_s,
                                                wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise PredictorUnavailable(f"Observe failed: {exc.code().name}: {exc.details()}",
                                       exc.code()) from exc
        if response.num_rejected:
            raise PredictorUnavailable("Observe rejected the observation (empty prompt?)")

    async def close(self) -> None:
        await self._channel.close()
