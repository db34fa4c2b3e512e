"""A small async client for the scheduler: predict lengths, report finished requests.

Usage::

    client = PredictorClient("127.0.0.1:50053")
    estimates = await client.predict(["Write a haiku"], timeout_s=0.05)
    await client.observe("Write a haiku", output_tokens=21, prediction_id=estimates[0].prediction_id)
    await client.close()

Every method raises :class:`PredictorUnavailable` on any failure (timeout, connection,
server error), so the caller can fall back to its running mean and say so in its status.
:meth:`PredictorClient.observe` sends one observation on a stream of its own; a scheduler
keeps one long-lived stream instead (``alise.scheduler.predictor_link.ObservationOutbox``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from alise.predictor.context import PromptContext
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
    #: What an Observation of this prompt's answer names ("" from a predictor without ids).
    prediction_id: str = ""


class PredictorClient:
    def __init__(self, address: str, *, channel: grpc.aio.Channel | None = None) -> None:
        self.address = address
        self._channel = channel or grpc.aio.insecure_channel(address)
        self._stub = predictor_pb2_grpc.PredictorServiceStub(self._channel)

    async def predict(self, prompts: Sequence[str], timeout_s: float = 1.0,
                      contexts: Sequence[PromptContext] | None = None) -> list[LengthEstimate]:
        """One estimate per prompt, in order; ``contexts``: one per prompt (the conversation it
        continues), or none."""
        request = predictor_pb2.PredictRequest(prompts=list(prompts))
        for c in contexts or ():
            request.contexts.add(previous_output_tokens=list(c.previous_output_tokens), query=c.query)
        try:
            response = await self._stub.Predict(
                request, timeout=timeout_s, wait_for_ready=True)  # a reconnecting channel gets the whole deadline
        except grpc.aio.AioRpcError as exc:
            raise PredictorUnavailable(f"Predict failed: {exc.code().name}: {exc.details()}",
                                       exc.code()) from exc
        ids = list(response.prediction_ids) or [""] * len(response.predictions)
        return [LengthEstimate(p.mean, p.p50, p.p90, p.source, i)
                for p, i in zip(response.predictions, ids, strict=True)]

    def observe_stream(self, *, timeout_s: float | None = None) -> grpc.aio.StreamStreamCall:
        """A new Observe stream (write Observations, read ObserveResponses)."""
        return self._stub.Observe(timeout=timeout_s, wait_for_ready=True)

    async def observe(self, prompt: str, output_tokens: int, *, model: str = "",
                      prediction_id: str = "", timeout_s: float = 10.0) -> None:
        """Reports one finished request (``model`` empty = the predictor's served model) and
        returns once it is durable. Raises :class:`PredictorUnavailable` when it was not taken."""
        observation = predictor_pb2.Observation(prompt=prompt, output_tokens=output_tokens, model=model,
                                                prediction_id=prediction_id, sequence=1)
        call = self.observe_stream(timeout_s=timeout_s)
        try:
            await call.write(observation)
            await call.done_writing()
            responses = [r async for r in call]
        except grpc.aio.AioRpcError as exc:
            raise PredictorUnavailable(f"Observe failed: {exc.code().name}: {exc.details()}",
                                       exc.code()) from exc
        if not responses or responses[-1].num_accepted != 1:
            raise PredictorUnavailable("Observe did not take the observation (empty prompt, "
                                       "negative length, or an unknown prediction id without the prompt)")

    async def close(self) -> None:
        await self._channel.close()
