"""The workers' side of the scheduler: ``WorkerService.Connect``, the stream each worker holds.

A worker's hello is checked whole (capacity bounds, the model and its weights, the held jobs)
before the worker joins; then the handler sends what the engine puts in the link's outbox
(``alise.core.commands.ToWorker``, in order) and posts each report to the engine, until
either side ends the stream.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from alise.common import wire
from alise.core.commands import Shutdown
from alise.core.latency_model import LatencyModel
from alise.modelinfo.served import ModelInfo
from alise.scheduler.engine import SchedulerEngine
from alise.scheduler.messages import WorkerJoined, WorkerLeft, WorkerReported
from alise.scheduler.worker_link import WorkerLink
from alise.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: SchedulerEngine, info: ModelInfo) -> None:
        self.engine = engine
        self.info = info
        #: The weights every worker must serve: the scheduler's directory's, else the first
        #: worker's (a preset's random weights exist only on the workers).
        self.weights = info.weights_fingerprint
        self._weights_from = f"the scheduler's {info.name}" if self.weights else ""

    async def Connect(self, request_iterator, context):
        try:
            first = await asyncio.wait_for(request_iterator.__anext__(), timeout=30.0)
        except (StopAsyncIteration, TimeoutError):
            return
        link = await self._link_from_hello(first, context)
        self.engine.inbox.post(WorkerJoined(link))
        reader = asyncio.create_task(self._read_reports(link, request_iterator))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(link.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return
                message = getter.result()
                yield wire.to_worker_pb(message)
                if isinstance(message, Shutdown):
                    return
        finally:
            reader.cancel()
            if getter is not None:
                getter.cancel()
            self.engine.inbox.post(WorkerLeft(link.worker_id))

    async def _link_from_hello(self, first, context) -> WorkerLink:
        """The link of a worker whose hello passes every check (else the call is aborted)."""
        if first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be a hello")
        hello = first.hello
        try:
            capacity = wire.capacity_from_hello(hello)
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad hello: {exc}")
        if capacity.worker_id in self.engine.links:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"worker id {capacity.worker_id!r} is already connected")
        if hello.model_id and hello.model_id != self.info.model_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker serves model {hello.model!r} ({hello.model_id}), the "
                                f"scheduler serves {self.info.name!r} ({self.info.model_id})")
        if hello.vocab_size and hello.vocab_size != self.info.vocab_size:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker serves a vocabulary of {hello.vocab_size}, the scheduler's "
                                f"model has {self.info.vocab_size}")
        profile = None
        if hello.latency_profile_json:
            try:
                profile = LatencyModel.from_json(hello.latency_profile_json)
            except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad latency profile in hello: {exc}")
        try:
            held = [wire.held_from_pb(h, self.info.vocab_size) for h in hello.held_jobs]
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad hello: {exc}")
        if refusal := self._weights_refusal(hello):  # last: the first worker to pass sets them
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        return WorkerLink(capacity, asyncio.Queue(), model=hello.model, device=hello.device,
                          latency_profile=profile, held=held, held_from=hello.held_from_scheduler_id)

    def _weights_refusal(self, hello) -> str | None:
        """Why a worker with other weights is refused (None: same weights, or unknown); the
        first worker with a fingerprint sets it when the scheduler has none of its own."""
        theirs = hello.weights_fingerprint
        if not theirs:
            return None
        if not self.weights:
            self.weights, self._weights_from = theirs, f"worker {hello.worker_id!r}, the first to join"
            logger.info("serving weights %s (those of worker %s)", theirs, hello.worker_id)
            return None
        if theirs == self.weights:
            return None
        return (f"worker {hello.worker_id!r} serves {hello.model!r} with weights {theirs}; this scheduler serves "
                f"weights {self.weights} (those of {self._weights_from}): same architecture, other weights "
                "(another checkpoint, or a preset with another seed, device or dtype)")

    async def _read_reports(self, link: WorkerLink, request_iterator) -> None:
        async for message in request_iterator:
            if message.WhichOneof("kind") != "report":
                link.outbox.put_nowait(Shutdown("protocol error: expected a step report"))
                return
            try:
                report = wire.report_from_pb(message.report)
            except wire.WireError as exc:
                link.outbox.put_nowait(Shutdown(f"protocol error: {exc}"))
                return
            self.engine.inbox.post(WorkerReported(link.worker_id, report))
