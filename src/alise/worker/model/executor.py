"""The real step of a worker: the forward pass over the paged cache, then sampling.

``ModelExecutor`` is the ``Executor`` the engine (``alise.worker.engine``) calls with a step's
feeds. Only the feeds that reach the end of their sequence are sampled; a prefill chunk that
stops short of it writes its K/V and yields nothing. ``launch`` / ``collect``
(:mod:`alise.worker.model.overlap`) are the same step, split for overlapped steps. ``make_worker_engine`` puts a runner,
its KV manager and this executor together.
"""

from __future__ import annotations

import time

import torch

from alise.core.commands import TokenLogprobs
from alise.worker.engine import Feed, WorkerEngine
from alise.worker.kv_manager import KvManager
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kv_offload import TorchKvMover
from alise.worker.model.overlap import OverlappedSteps, sample_feeds
from alise.worker.model.sampler import Sampler, make_generator


class ModelExecutor(OverlappedSteps):
    def __init__(self, runner, eos_token_id: int | None = None) -> None:
        self.runner = runner
        self.sampler = Sampler(eos_token_id)
        self.vocab_size = runner.vocab_size

    def make_generator(self, seed: int) -> torch.Generator:
        return make_generator(seed, self.runner.device)

    def release(self, job_id: str) -> None:
        self.runner.release(job_id)

    def execute(self, feeds: list[Feed]) -> tuple[list[int], float, list[TokenLogprobs | None] | None]:
        start = time.perf_counter()
        # A chunk that stops short of its sequence's end needs no logits (nothing is sampled).
        chunks = [SeqChunk(f.token_ids, f.start, f.seq.block_table, needs_logits=f.samples) for f in feeds]
        logits = self.runner.execute(chunks, seq_ids=[f.seq.job_id for f in feeds])
        rows = [i for i, f in enumerate(feeds) if f.samples]
        tokens: list[int] = []
        logprobs = None
        if rows:
            if logits.shape[0] != len(rows):  # a runner that returns every chunk's row
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            ids, on_device = sample_feeds(self.sampler, logits, [feeds[i] for i in rows])
            tokens = ids.tolist()
            # Queued before the ids were read: the device has computed them already.
            logprobs = on_device.unpack(on_device.packed.cpu()) if on_device is not None else None
        elif logits.device.type == "cuda":
            torch.cuda.current_stream(logits.device).synchronize()  # the step's time includes its work
        return tokens, time.perf_counter() - start, logprobs


def make_worker_engine(runner, *, eos_token_id: int | None, max_model_len: int,
                       num_host_blocks: int = 0, prefix_caching: bool = False) -> WorkerEngine:
    """The engine of a worker over ``runner`` (a ``ModelRunner`` or ``TransformersRunner``)."""
    mover = TorchKvMover(runner.kv_cache, num_host_blocks)
    kv = KvManager(runner.num_blocks, num_host_blocks, runner.block_size, mover, prefix_caching=prefix_caching)
    return WorkerEngine(ModelExecutor(runner, eos_token_id), kv, eos_token_id=eos_token_id, max_model_len=max_model_len)
