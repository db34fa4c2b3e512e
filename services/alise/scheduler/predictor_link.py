"""The scheduler's connection to the predictor service (adapts PredictorClient to the
functions LengthEstimator takes, with the internal credential and TLS)."""

from __future__ import annotations

from alise.client._channel import make_aio_channel
from alise.common.security import SecurityConfig
from alise.core.job import LengthEstimate
from alise.predictor.client import PredictorClient


def predictor_functions(address: str, security: SecurityConfig | None = None):
    security = security or SecurityConfig()
    channel = make_aio_channel(address, tls=bool(security.tls_ca), tls_ca=security.tls_ca,
                               metadata=security.internal_metadata())
    client = PredictorClient(address, channel=channel)

    async def predict(prompts: list[str], prompt_tokens: list[int], timeout_s: float) -> list[LengthEstimate]:
        estimates = await client.predict(prompts, timeout_s=timeout_s)
        return [LengthEstimate(max(e.mean, 0.0), max(e.p50, 0.0), max(e.p90, 0.0), e.source)
                for e in estimates]

    async def observe(prompt: str, prompt_tokens: int, output_tokens: int) -> None:
        await client.observe(prompt, output_tokens)

    return predict, observe
