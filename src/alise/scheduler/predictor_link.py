"""The scheduler's connection to the predictor service: Predict calls, and finished requests
sent back over one long-lived Observe stream (with the internal credential and TLS).

:class:`ObservationOutbox` holds every finished request until the predictor says it is
durable (in its history and write-ahead log), so a predictor that is down, restarting or
slow loses nothing: observations wait in a bounded buffer (``max_buffered``; past it the
oldest are dropped, counted and logged) and are sent when a stream is open again. An
observation names the Predict it answers (``prediction_id``); its prompt is sent only when
it has no id, or when the predictor answers that it no longer knows the id (it restarted):
then it goes again, with the prompt, as a new observation.

Exactly once: each observation has a sequence number, increasing in the order sent, and the
outbox a sender id. After a broken stream every unsettled observation is resent on the next
one, in order, with its number; the predictor takes a (sender, sequence) it already took as
taken, so one whose answer was lost counts once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from alise.client.channel import make_aio_channel
from alise.common.security import SecurityConfig
from alise.predictor.client import PredictorClient
from alise.predictor.context import PromptContext
from alise.scheduler.estimates import PredictedLength
from alise.v1 import predictor_pb2

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    prediction_id: str
    prompt: str
    prompt_tokens: int
    output_tokens: int
    with_prompt: bool


class ObservationOutbox:
    """Finished requests on their way to the predictor; :meth:`add` never blocks."""

    def __init__(self, client: PredictorClient, *, max_buffered: int = 10_000,
                 retry_s: tuple[float, float] = (0.2, 5.0)) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.client = client
        self.max_buffered = max_buffered
        self.retry_s = retry_s
        self.sender = os.urandom(8).hex()
        self.num_dropped = 0
        self.num_settled = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_sequence = 1
        self._outgoing: asyncio.Queue | None = None  # the open stream's send queue
        self._has_work = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def num_buffered(self) -> int:
        return len(self._entries)

    def add(self, prediction_id: str, prompt: str, prompt_tokens: int, output_tokens: int) -> None:
        if not prediction_id and not prompt:
            return
        self._push(_Entry(prediction_id, prompt, prompt_tokens, output_tokens, not prediction_id))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="predictor-observe")

    def _push(self, entry: _Entry) -> None:
        while len(self._entries) >= self.max_buffered:
            self._entries.popitem(last=False)
            self.num_dropped += 1
            if self.num_dropped in (1, 10, 100) or self.num_dropped % 1000 == 0:
                logger.warning("predictor observations buffer full (%d): %d oldest dropped so far",
                               self.max_buffered, self.num_dropped)
        sequence = self._next_sequence
        self._next_sequence += 1
        self._entries[sequence] = entry
        if self._outgoing is not None:
            self._outgoing.put_nowait(sequence)
        self._has_work.set()

    def _message(self, sequence: int) -> predictor_pb2.Observation | None:
        entry = self._entries.get(sequence)
        if entry is None:  # settled or dropped meanwhile
            return None
        return predictor_pb2.Observation(
            prompt=entry.prompt if entry.with_prompt else "", output_tokens=entry.output_tokens,
            prompt_tokens=entry.prompt_tokens, prediction_id=entry.prediction_id,
            sequence=sequence, sender=self.sender)

    def _settle(self, response: predictor_pb2.ObserveResponse) -> None:
        unknown = set(response.unknown_sequences)
        while self._entries:
            sequence = next(iter(self._entries))
            if sequence > response.durable_sequence:
                break
            entry = self._entries.pop(sequence)
            if sequence in unknown:
                entry.with_prompt = True
                self._push(entry)  # again, with the prompt, as a new observation
            else:
                self.num_settled += 1
        if not self._entries:
            self._has_work.clear()

    async def _send(self, call, outgoing: asyncio.Queue) -> None:
        while True:
            message = self._message(await outgoing.get())
            if message is not None:
                await call.write(message)

    async def _stream_once(self) -> None:
        outgoing: asyncio.Queue = asyncio.Queue()
        for sequence in self._entries:  # unsettled first, in order, with their numbers
            outgoing.put_nowait(sequence)
        self._outgoing = outgoing
        call = self.client.observe_stream()
        sender = asyncio.create_task(self._send(call, outgoing))
        try:
            async for response in call:
                self._settle(response)
        finally:
            self._outgoing = None
            sender.cancel()
            call.cancel()

    async def _run(self) -> None:
        delay = self.retry_s[0]
        while True:
            await self._has_work.wait()
            settled = self.num_settled
            try:
                await self._stream_once()
            except grpc.aio.AioRpcError as exc:
                logger.debug("observe stream broke (%s); %d observations wait", exc.code().name,
                             len(self._entries))
            except (ConnectionError, grpc.RpcError) as exc:
                logger.debug("observe stream broke (%s)", exc)
            delay = self.retry_s[0] if self.num_settled > settled else min(2 * delay, self.retry_s[1])
            await asyncio.sleep(delay)

    async def flush(self, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` for every buffered observation to settle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._entries and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return not self._entries

    async def close(self, timeout_s: float = 1.0) -> None:
        """Gives buffered observations ``timeout_s`` to settle, then stops."""
        if self._task is not None:
            if not await self.flush(timeout_s):
                logger.warning("%d observations not delivered to the predictor at shutdown",
                               len(self._entries))
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.client.close()


def predictor_functions(address: str, security: SecurityConfig | None = None):
    """(predict, outbox) for :class:`alise.scheduler.estimates.LengthEstimator`."""
    security = security or SecurityConfig()
    channel = make_aio_channel(address, tls=bool(security.tls_ca), tls_ca=security.tls_ca,
                               metadata=security.internal_metadata())
    client = PredictorClient(address, channel=channel)

    async def predict(prompts: list[str], prompt_tokens: list[int], timeout_s: float,
                      contexts: list[PromptContext] | None = None) -> list[PredictedLength]:
        estimates = await client.predict(prompts, timeout_s=timeout_s, contexts=contexts)
        return [PredictedLength(max(e.mean, 0.0), max(e.p50, 0.0), max(e.p90, 0.0), e.source,
                                prediction_id=e.prediction_id) for e in estimates]

    return predict, ObservationOutbox(client)
