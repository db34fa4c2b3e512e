"""The blocking client (same surface as AsyncClient)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

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
from alise.client.aio import DEFAULT_ADDRESS, RESUME_TIMEOUT_S
from alise.client.channel import check_address, make_channel
from alise.client.errors import AliseError
from alise.client.types import Chunk, Completion, Conversation, Status
from alise.v1 import scheduler_pb2, scheduler_pb2_grpc


class Client:
    """Blocking ALISE client. Closing the ``generate`` iterator early cancels the request.

    ``address`` is HOST:PORT (ValueError otherwise)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None,
                 timeout_s: float | None = None, tls_ca: str | None = None) -> None:
        self.address = check_address(address)
        self.timeout_s = timeout_s
        self._tls_ca = tls_ca
        self._metadata = bearer_metadata(token)
        self._channel = make_channel(address, tls_ca=tls_ca)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int = 0,
                 min_p: float | None = None, seed: int | None = None, stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False, request_id: str = "", oracle_output_tokens: int = 0,
                 timeout_s: float | None = None, token: str | None = None,
                 resume_timeout_s: float = RESUME_TIMEOUT_S, wait_for_ready: bool = False,
                 on_accepted: Callable[[], None] | None = None,
                 conversation: Conversation | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0, min_tokens: int = 0,
                 logit_bias: Mapping[int, float] | None = None, logprobs: int | None = None) -> Iterator[Chunk]:
        """As ``AsyncClient.generate``: a broken stream is resumed, every token delivered once;
        ``wait_for_ready`` waits for a scheduler that does not answer yet; ``on_accepted`` is
        called once when the scheduler has accepted the request, before its first chunk;
        ``conversation`` goes to the length predictor only; the penalties, ``min_tokens`` and
        ``logit_bias`` are vLLM's, and so are ``logprobs`` (``AsyncClient.generate``)."""
        request = build_request(prompt, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed,
                                stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                request_id=request_id, oracle_output_tokens=oracle_output_tokens,
                                min_p=min_p, conversation=conversation, presence_penalty=presence_penalty,
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
                    resumer.note_metadata(call.initial_metadata())
                    if resumer.accepted:
                        on_accepted()
                for response in call:
                    chunk = to_chunk(response)
                    resumer.accept(chunk)
                    yield chunk
                return
            except grpc.RpcError as exc:
                resumer.note_metadata(call.initial_metadata())
                delay = resumer.retry_after(exc)
                if delay is None:
                    raise explain(exc, self.address, self._tls_ca) from None
            finally:
                call.cancel()
            time.sleep(delay)

    def complete(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        chunks = list(self.generate(prompt, **kwargs))
        if not chunks:
            raise AliseError(grpc.StatusCode.INTERNAL, "the stream ended without output")
        return join_chunks(chunks)

    def status(self, *, timeout_s: float | None = 5.0, token: str | None = None) -> Status:
        try:
            msg = self._stub.GetStatus(scheduler_pb2.GetStatusRequest(), timeout=timeout_s,
                                       metadata=call_metadata(token, self._metadata))
        except grpc.RpcError as exc:
            raise explain(exc, self.address, self._tls_ca) from None
        return to_status(msg)

    def health(self, service: str = "", *, timeout_s: float | None = 5.0) -> str:
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise explain(exc, self.address, self._tls_ca) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
