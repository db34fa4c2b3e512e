"""The asyncio client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.client._convert import (
    bearer_metadata,
    build_request,
    call_metadata,
    call_timeout_s,
    join_chunks,
    to_chunk,
    to_status,
)
from alise.client._peer import explain
from alise.client._resume import Resumer
from alise.client.channel import check_address, make_aio_channel
from alise.client.errors import AliseError
from alise.client.types import Chunk, Completion, Conversation, Status
from alise.v1 import scheduler_pb2, scheduler_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
#: How long a broken stream is resumed without progress before the error is raised.
RESUME_TIMEOUT_S = 30.0


class AsyncClient:
    """Talks to an ALISE scheduler.

    ``generate`` yields chunks as tokens are produced; leaving the loop early (``break``,
    an exception, task cancellation) cancels the request on the server, which frees its
    memory at the next step. ``timeout_s`` is a per-call deadline. ``address`` is HOST:PORT
    (ValueError otherwise).
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None,
                 timeout_s: float | None = None, tls_ca: str | None = None,
                 channel: grpc.aio.Channel | None = None) -> None:
        self.address = check_address(address)
        self.timeout_s = timeout_s
        self._tls_ca = tls_ca
        self._metadata = bearer_metadata(token)
        self._channel = channel or make_aio_channel(address, tls_ca=tls_ca)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _error(self, exc: grpc.aio.AioRpcError) -> AliseError:
        # explain() may ask the server what it is (a blocking reflection call): off the loop.
        return await asyncio.to_thread(explain, exc, self.address, self._tls_ca)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | Sequence[int], *, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       top_k: int = 0, min_p: float | None = None, seed: int | None = None,
                       stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                       request_id: str = "", oracle_output_tokens: int = 0,
                       timeout_s: float | None = None, token: str | None = None,
                       resume_timeout_s: float = RESUME_TIMEOUT_S,
                       wait_for_ready: bool = False,
                       on_accepted: Callable[[], Awaitable[None]] | None = None,
                       conversation: Conversation | None = None,
                       strict_max_tokens: bool = False, presence_penalty: float = 0.0,
                       frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                       min_tokens: int = 0, logit_bias: Mapping[int, float] | None = None,
                       logprobs: int | None = None) -> AsyncIterator[Chunk]:
        """Streams the request's chunks; a stream that breaks (UNAVAILABLE) is resumed for up to
        ``resume_timeout_s`` without progress (0: never), every token delivered once. ``token``
        overrides the client's bearer token for this call. ``wait_for_ready``: a request sent
        while no scheduler answers (one restarting) waits for one, up to ``timeout_s``, instead
        of failing at once with UNAVAILABLE. ``on_accepted`` is awaited once, when the scheduler
        has accepted the request (it passed validation, the token check and admission), before
        its first chunk: a relay can answer its own client then, while the job is queued.
        ``conversation``: the conversation the prompt continues (its latest user message and the
        earlier answers' lengths), read by the length predictor only. ``strict_max_tokens``: a
        prompt and ``max_tokens`` that exceed the context together are refused (InvalidRequest,
        as vLLM refuses them) instead of ending where the context fills. vLLM's logit
        adjustments, on the raw logits (greedy too): ``presence_penalty`` and
        ``frequency_penalty`` in [-2, 2], ``repetition_penalty`` > 0 (1: none), ``min_tokens``
        (no stop id or EOS before that many tokens, at most ``max_tokens``) and ``logit_bias``
        (token id -> bias in [-100, 100], at most 300); a bad value is a ValueError naming it.
        ``logprobs`` (0..20; None: none): each chunk's ``logprobs`` gives every token's raw
        logprob (vLLM's: the model's log-softmax before the adjustments and temperature) and
        those of that many most likely tokens."""
        request = build_request(prompt, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed,
                                stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                request_id=request_id, oracle_output_tokens=oracle_output_tokens,
                                min_p=min_p, conversation=conversation,
                                strict_max_tokens=strict_max_tokens, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                                min_tokens=min_tokens, logit_bias=logit_bias, logprobs=logprobs)
        resumer = Resumer(request, resume_timeout_s=resume_timeout_s,
                          timeout_s=call_timeout_s(timeout_s, self.timeout_s), wait_for_ready=wait_for_ready)
        metadata = call_metadata(token, self._metadata)
        while True:
            message, timeout = resumer.next_request()
            call = self._stub.Generate(message, timeout=timeout, metadata=metadata,
                                       wait_for_ready=wait_for_ready or None)
            try:
                if on_accepted is not None and not resumer.accepted:
                    resumer.note_metadata(await call.initial_metadata())
                    if resumer.accepted:
                        await on_accepted()
                async for response in call:
                    chunk = to_chunk(response)
                    resumer.accept(chunk)
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                resumer.note_metadata(await call.initial_metadata())
                delay = resumer.retry_after(exc)
                if delay is None:
                    raise await self._error(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def complete(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        chunks = [chunk async for chunk in self.generate(prompt, **kwargs)]
        if not chunks:
            raise AliseError(grpc.StatusCode.INTERNAL, "the stream ended without output")
        return join_chunks(chunks)

    async def status(self, *, timeout_s: float | None = 5.0, token: str | None = None) -> Status:
        try:
            msg = await self._stub.GetStatus(scheduler_pb2.GetStatusRequest(), timeout=timeout_s,
                                             metadata=call_metadata(token, self._metadata))
        except grpc.aio.AioRpcError as exc:
            raise await self._error(exc) from None
        return to_status(msg)

    async def metrics(self, *, timeout_s: float | None = 5.0, token: str | None = None) -> tuple[str, str]:
        """(the scheduler's Prometheus metrics in the text format, its model)."""
        try:
            msg = await self._stub.GetMetrics(scheduler_pb2.GetMetricsRequest(), timeout=timeout_s,
                                              metadata=call_metadata(token, self._metadata))
        except grpc.aio.AioRpcError as exc:
            raise await self._error(exc) from None
        return msg.text, msg.model

    async def health(self, service: str = "", *, timeout_s: float | None = 5.0) -> str:
        """The scheduler's grpc.health.v1 status: "SERVING", "NOT_SERVING", ... (open: no token)."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                             timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise await self._error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
