"""One request's run through the scheduler: SDK chunks in, text pieces out, stop strings applied.

Leaving ``pieces`` early (a stop string matched, the client went away, the task was
cancelled) closes the SDK's stream, which cancels the gRPC call; the scheduler then aborts the
job and frees its KV blocks at the next step. A stop string's tokens count as generated
(``completion_tokens``), as the model did produce them. The scheduler saw such a request
cancelled; the door counts it as finished (``HttpMetrics.stopped_by_string``).

With logprobs asked, every piece's tokens carry theirs. A stream the SDK resumed after a
scheduler restart carries none for the tokens made while it was away (the scheduler keeps
none): the request then fails (500) rather than answer with tokens missing
their logprobs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from alise.client import AliseError, AsyncClient, TokenLogprobs
from alise.http.protocol import GenerationRequest
from alise.http.shapes import FINISH_REASONS, Facts
from alise.http.stops import StopStrings


@dataclass(frozen=True)
class Piece:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # OpenAI's, on the last piece only
    logprobs: list[TokenLogprobs] | None = None   # one per token, when the request asked


async def pieces(client: AsyncClient, req: GenerationRequest, prompt: str | list[int], facts: Facts, *,
                 token: str | None, timeout_s: float,
                 on_accepted: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[Piece]:
    """Raises the SDK's AliseError subclasses; fills ``facts`` as chunks arrive; awaits
    ``on_accepted`` when the scheduler has accepted the request."""
    stops = StopStrings(req.stop)
    # wait_for_ready: a request sent while the scheduler restarts waits for it (the relay bounds
    # that wait) instead of failing at once.
    stream = client.generate(
        prompt, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, request_id=facts.request_id, oracle_output_tokens=req.oracle_output_tokens,
        timeout_s=timeout_s, token=token, wait_for_ready=True, on_accepted=on_accepted,
        conversation=req.conversation, strict_max_tokens=True, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        min_tokens=req.min_tokens, logit_bias=req.logit_bias, logprobs=req.logprobs)
    try:
        async for chunk in stream:
            if chunk.prompt_tokens is not None:
                facts.prompt_tokens = chunk.prompt_tokens
            if chunk.estimate is not None:
                facts.estimate = chunk.estimate
            facts.completion_tokens += len(chunk.token_ids)
            if req.logprobs is not None and chunk.token_ids and chunk.logprobs is None:
                raise AliseError(grpc.StatusCode.INTERNAL, f"the logprobs of tokens {chunk.index} to "
                                 f"{chunk.index + len(chunk.token_ids) - 1} were lost (the scheduler restarted "
                                 "while they were made); retry the request")
            text = stops.feed(chunk.text)
            if stops.matched:
                facts.stopped_by_string = True
                yield Piece(text, chunk.token_ids, "stop", chunk.logprobs)
                return
            if chunk.finish_reason is not None:
                facts.usage = chunk.usage
                if chunk.usage is not None:
                    facts.completion_tokens = chunk.usage.completion_tokens
                yield Piece(text + stops.flush(), chunk.token_ids, FINISH_REASONS[chunk.finish_reason],
                            chunk.logprobs)
                return
            yield Piece(text, chunk.token_ids, logprobs=chunk.logprobs)
        raise AliseError(grpc.StatusCode.INTERNAL, "the scheduler's stream ended without a finish reason")
    finally:
        await stream.aclose()
