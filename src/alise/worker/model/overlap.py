"""Overlapped steps: step n+1 is launched before step n's sampled tokens reach the host.

The synchronous step reads its sampled ids back with ``.tolist()``, so the device idles while
the worker builds the report, takes the next plan and prepares the next step. With overlap
(``alise worker --async-steps``), :meth:`OverlappedSteps.launch` queues a step's forward and
sampling on the device and starts an asynchronous copy of its sampled ids (with the logprobs
of the rows that ask) into pinned host buffers (:class:`SampledIds`), returning at once; the
next step is launched behind it, its decode rows taking their input ids on the device from
the step before (:class:`TokenGather`); only then does :meth:`OverlappedSteps.collect` wait for the first step's ids.

NOTE: nothing in a launch may wait for the device's queue, or the overlap is lost: every
host-to-device copy goes through pinned memory, non-blocking (:class:`PinnedUploads`; a pageable
``torch.tensor(..., device=cuda)`` or ``.to(cuda)`` waits for the stream): the sampler's rows and
parameters, the token gather's rows, and on an eager step (no CUDA graph replayed) its input ids,
its logit rows and its attention metadata (``ModelRunner.execute(upload=...)``). Ordering needs
no waits: one compute stream runs step n, then step n+1's uploads into the static graph buffers,
its token gather, its forward; the KV mover's side stream waits for that stream before each
copy. On the CPU every launch completes before it returns, so the same code runs serially.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from alise.core.commands import TokenLogprobs
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.sampler import History, Logprobs, Sampler, Upload


def histories(feeds: list) -> list[History | None] | None:
    """Each sampling feed's (the engine's ``Feed``) token history where its params need one
    (``SamplingParams.needs_history``); None when none does, the common case, which builds
    nothing. A feed whose token is still on the device (``source_row``) counts it as output."""
    if not any(f.seq.sampling.needs_history for f in feeds):
        return None
    return [History(f.seq.token_ids, f.seq.num_generated + (f.source_row is not None), f.source_row)
            if f.seq.sampling.needs_history else None for f in feeds]


def sample_feeds(sampler: Sampler, logits: torch.Tensor, sampled: list, upload: Upload | None = None,
                 pending_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Logprobs | None]:
    """The sampled ids of a step's sampling feeds (on the device) and the logprobs of the rows
    that ask, for both step paths. One scan of the rows (``needs_extras``) decides whether a
    plain step's sampling does anything beyond its filters and draw: usually it does not.
    ``pending_ids``: the step before's ids, where an overlapped step's rows have their last
    token still (``History.pending_row``)."""
    params = [f.seq.sampling for f in sampled]
    extras = any(p.needs_extras for p in params)
    ids = sampler.sample_ids(logits, params, [f.seq.generator for f in sampled], upload=upload,
                             histories=histories(sampled) if extras else None, pending_ids=pending_ids,
                             adjust=extras)
    return ids, sampler.logprobs(logits, params, ids, upload) if extras else None


class PinnedUploads:
    """Host-to-device copies of small arrays that never block the host on the device's queue.

    ``upload(values, dtype)``: ``values`` (a sequence, a numpy array or a CPU tensor, of any
    shape) as a tensor of ``dtype`` on the device, filled by a non-blocking copy out of a pinned
    staging buffer. NOTE: a staging buffer is refilled only once its last copy has run on the
    stream (its event has fired); while the oldest has not, a new one is added. Events fire in
    stream order, so the oldest is the only one to ask; the pool grows to the uploads of the
    steps in flight (two under overlap, a few dozen copies) and stays there. On the CPU this is
    ``torch.as_tensor(values, dtype=dtype)``: the synchronous path's tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        #: (the event after its last copy, its buffer per dtype), oldest copy first.
        self._slots: deque[tuple[torch.cuda.Event, dict]] = deque()

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def __call__(self, values, dtype: torch.dtype) -> torch.Tensor:
        if not self.on_cuda:
            return torch.as_tensor(values, dtype=dtype, device=self.device)
        if self._slots and self._slots[0][0].query():
            event, buffers = self._slots.popleft()
        else:
            event, buffers = torch.cuda.Event(), {}
        array = np.asarray(values)
        n = array.size
        host = buffers.get(dtype)
        if host is None or host.numel() < n:
            host = buffers[dtype] = torch.empty(max(n, 256), dtype=dtype, pin_memory=True)
        host.numpy()[:n] = array.reshape(-1)
        out = torch.empty(array.shape, dtype=dtype, device=self.device)
        out.copy_(host[:n].view(array.shape), non_blocking=True)
        event.record()
        self._slots.append((event, buffers))
        return out


@dataclass(frozen=True)
class TokenGather:
    """Input ids still on the device: row ``rows[i]`` of a step's flat input ids (chunks in
    order, their tokens concatenated) is ``source[source_rows[i]]``, the id the step before
    sampled. Applied after the step's host ids are uploaded and before its forward."""

    rows: torch.Tensor
    source_rows: torch.Tensor
    source: torch.Tensor

    def apply(self, input_ids: torch.Tensor) -> None:
        input_ids.index_copy_(0, self.rows, self.source.index_select(0, self.source_rows))


@dataclass(eq=False)
class SampledIds:
    """A launched step's sampled ids: on the device (``ids``, what the next step gathers from)
    and on their way into a pinned host buffer (``host``, complete once ``ready`` has fired)."""

    ids: torch.Tensor | None
    host: torch.Tensor | None
    ready: torch.cuda.Event | None
    #: CUDA: events around the step's work on the stream; CPU: perf_counter at launch and return.
    started: object
    ended: object
    #: The rows' logprobs where one asked (``Sampler.logprobs``), and the host buffer their
    #: copy fills before ``ready`` fires, with the ids'.
    logprobs: Logprobs | None = None
    logprobs_host: torch.Tensor | None = None

    def tokens(self) -> list[int]:
        if self.ids is None:
            return []
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()

    def token_logprobs(self) -> list[TokenLogprobs | None] | None:
        """Read after :meth:`tokens` (which waited for the copy)."""
        if self.logprobs is None:
            return None
        return self.logprobs.unpack(self.logprobs_host)

    def seconds(self) -> float:
        """The step's own time: on CUDA between its events on the stream (it starts when the
        step before it ends there), else the launch's wall time."""
        if isinstance(self.started, float):
            return self.ended - self.started
        self.ended.synchronize()
        return self.started.elapsed_time(self.ended) / 1e3


class OverlappedSteps:
    """``launch`` and ``collect`` of :class:`alise.worker.model.executor.ModelExecutor` (which
    sets ``runner``, ``sampler`` and the ``execute`` they mirror)."""

    @property
    def can_overlap(self) -> bool:
        """One device with the paged runner (a tensor-parallel step broadcasts its tokens from
        the host; the transformers runner takes no device-side ids)."""
        return getattr(self.runner, "tp", True) is None

    def _overlap_state(self) -> tuple[PinnedUploads, list[torch.Tensor]]:
        state = getattr(self, "_overlap", None)
        if state is None:
            on_cuda = self.runner.device.type == "cuda"
            # Two host buffers: step n's is read after step n+1 has been launched into the other.
            buffers = [torch.empty(self.runner.max_num_seqs, dtype=torch.int64, pin_memory=on_cuda)
                       for _ in range(2)]
            state = self._overlap = (PinnedUploads(self.runner.device), buffers)
        return state

    def _clock(self) -> object:
        if self.runner.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def launch(self, feeds: list, previous: SampledIds | None) -> SampledIds:
        """Queues one step over ``feeds`` (the engine's ``Feed``); a feed whose ``source_row``
        is set takes its one input id from row ``source_row`` of ``previous``'s sampled ids."""
        upload, buffers = self._overlap_state()
        started = self._clock()
        chunks = [SeqChunk(f.token_ids, f.start, f.seq.block_table, needs_logits=f.samples) for f in feeds]
        gather = None
        flat = np.cumsum([0] + [f.num_tokens for f in feeds])
        pairs = [(int(flat[i]), f.source_row) for i, f in enumerate(feeds) if f.source_row is not None]
        if pairs:
            both = upload([row for row, _ in pairs] + [src for _, src in pairs], torch.int64)
            gather = TokenGather(both[:len(pairs)], both[len(pairs):], previous.ids)
        logits = self.runner.execute(chunks, gather=gather, upload=upload)
        sampled = [f for f in feeds if f.samples]
        ids = host = ready = logprobs = logprobs_host = None
        if sampled:
            # A penalized row's last token may still be on the device, in ``previous.ids``:
            # the sampler counts it there (``History.pending_row``), so no step waits for it.
            ids, logprobs = sample_feeds(self.sampler, logits, sampled, upload,
                                         previous.ids if previous is not None else None)
            self._flip = 1 - getattr(self, "_flip", 0)
            buffer = buffers[self._flip]
            if buffer.numel() < len(sampled):
                buffer = buffers[self._flip] = torch.empty(len(sampled), dtype=torch.int64,
                                                           pin_memory=buffer.is_pinned())
            host = buffer[:len(sampled)]
            host.copy_(ids, non_blocking=True)
            if logprobs is not None:
                # Pinned blocks come from torch's caching host allocator, which reuses one only
                # once the copies it was recorded with have run.
                logprobs_host = torch.empty(logprobs.packed.shape, dtype=torch.float64,
                                            pin_memory=buffer.is_pinned())
                logprobs_host.copy_(logprobs.packed, non_blocking=True)
            if self.runner.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
        return SampledIds(ids, host, ready, started, self._clock(), logprobs, logprobs_host)

    @staticmethod
    def done(launched: SampledIds) -> bool:
        """Whether the device has run a launched step to its end (always, on the CPU)."""
        return isinstance(launched.ended, float) or launched.ended.query()

    @staticmethod
    def collect(launched: SampledIds) -> tuple[list[int], float, list[TokenLogprobs | None] | None]:
        """Waits for a launched step: its sampled ids (in the order of its sampling feeds), its
        seconds and its rows' logprobs (None: no row asked)."""
        return launched.tokens(), launched.seconds(), launched.token_logprobs()
