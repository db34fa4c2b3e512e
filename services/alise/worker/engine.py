"""The worker's engine: continuous batching over the paged KV cache.

Mechanism only. The scheduler decides who runs; the engine carries out its commands
(admit, pause with a KV action, resume, abort) and runs one model step at a time over
the active sequences. Sequences join and leave at step boundaries.

Token arithmetic (mirrored by ``alise.core.blocks``): a sequence of ``n`` tokens whose
first ``c`` positions are cached feeds tokens ``[c, n)`` in its next step and needs
``ceil(n / block_size)`` blocks for it; after the step ``c = n`` and one sampled token is
appended.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from alise.core.blocks import blocks_for
from alise.core.commands import (
    Abort,
    Admit,
    Command,
    JobOutput,
    KvAction,
    Pause,
    Refusal,
    Resume,
    StepReport,
)
from alise.core.job import FinishReason, KvPlace
from alise.core.sampling import SamplingParams
from alise.worker.block_allocator import BlockAllocator
from alise.worker.kv_offload import KvOffload
from alise.worker.model_runner import ModelRunner, SeqChunk
from alise.worker.sampler import Sampler, make_generator

logger = logging.getLogger(__name__)


@dataclass
class Sequence:
    job_id: str
    token_ids: list[int]
    sampling: SamplingParams
    num_generated: int
    generator: torch.Generator | None
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    paused: bool = False
    #: KV state moved by ``KvOffload`` (quantized, on host, or a swap-in in flight).
    place: KvPlace = KvPlace.DEVICE
    host_blocks: list[int] = field(default_factory=list)
    ready_event: object | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class WorkerEngine:
    def __init__(self, runner: ModelRunner, *, eos_token_id: int | None,
                 max_model_len: int, num_host_blocks: int = 0) -> None:
        self.runner = runner
        self.sampler = Sampler()
        self.eos_token_id = eos_token_id
        # No sequence may outgrow the whole cache: it ends there (LENGTH) instead of
        # waiting forever for blocks that cannot exist.
        self.max_model_len = min(max_model_len, runner.num_blocks * runner.block_size)
        self.block_size = runner.block_size
        self.allocator = BlockAllocator(runner.num_blocks)
        self.num_host_blocks = num_host_blocks
        self.offload = KvOffload(runner.kv_cache, self.allocator, num_host_blocks)
        self.seqs: dict[str, Sequence] = {}
        #: The last model step's shape, as ``LatencyModel.fit`` takes it: sequences, context
        #: tokens (cached + fed), lengths of the multi-token chunks; None before the first step.
        self.last_step_shape: tuple[int, int, list[int]] | None = None

    # ----------------------------------------------------------------- commands

    def apply(self, commands: list[Command]) -> list[Refusal]:
        refused = []
        for command in commands:
            reason = self._apply_one(command)
            if reason is not None:
                name = type(command).__name__.lower()
                refused.append(Refusal(command.job_id, name, reason))
                logger.warning("refused %s of %s: %s", name, command.job_id, reason)
        return refused

    def _apply_one(self, command: Command) -> str | None:
        seq = self.seqs.get(command.job_id)
        if isinstance(command, Admit):
            return self._admit(command)
        if seq is None:
            return None if isinstance(command, Abort) else f"unknown job {command.job_id}"
        if isinstance(command, Abort):
            self._release(seq)
            del self.seqs[seq.job_id]
        elif isinstance(command, Pause):
            return self._pause(seq, command.action)
        elif isinstance(command, Resume):
            reason = self.offload.resume(seq)
            seq.paused = reason is not None
            return reason
        return None

    def _admit(self, command: Admit) -> str | None:
        if command.job_id in self.seqs:
            return f"job {command.job_id} is already on this worker"
        if not command.token_ids:
            return "empty prompt"
        if len(command.token_ids) >= self.max_model_len:
            return f"{len(command.token_ids)} tokens do not fit the context of {self.max_model_len}"
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in command.token_ids):
            return f"token ids must be in [0, {vocab})"
        generator = None
        if command.sampling.seed is not None:
            generator = make_generator(command.sampling.seed, self.runner.device)
        self.seqs[command.job_id] = Sequence(
            command.job_id, list(command.token_ids), command.sampling,
            command.num_generated, generator)
        return None

    def _pause(self, seq: Sequence, action: KvAction) -> str | None:
        seq.paused = True  # the pause always happens; a refused KV move leaves the KV as it was
        return self.offload.pause(seq, action)

    def _release(self, seq: Sequence) -> None:
        self.offload.release(seq)
        self.runner.release(seq.job_id)

    def abort_all(self) -> None:
        for seq in self.seqs.values():
            self._release(seq)
        self.seqs.clear()

    # ----------------------------------------------------------------- stepping

    def step(self, step_id: int) -> StepReport:
        """Runs one model step over every active sequence (blocking: call off the loop)."""
        batch = self._grow_blocks([s for s in self.seqs.values() if not s.paused])
        report = StepReport(step_id=step_id)
        self.offload.wait_ready(batch)  # swapped-in jobs run only once their blocks are back
        if batch:
            start = time.perf_counter()
            chunks = [SeqChunk(s.token_ids[s.num_cached:], s.num_cached, s.block_table)
                      for s in batch]
            logits = self.runner.execute(chunks, seq_ids=[s.job_id for s in batch])
            params = [s.sampling for s in batch]
            sampled = self.sampler.sample(logits, params, [s.generator for s in batch])
            report.step_duration_s = time.perf_counter() - start
            self.last_step_shape = (len(chunks), sum(c.start_pos + len(c.token_ids) for c in chunks),
                                    [len(c.token_ids) for c in chunks if len(c.token_ids) > 1])
            for seq, chunk, token in zip(batch, chunks, sampled):
                if len(chunk.token_ids) > 1:
                    report.num_prefill_tokens += len(chunk.token_ids)
                else:
                    report.num_decode_tokens += 1
                seq.num_cached = seq.num_tokens
                report.outputs.append(self._append(seq, token))
        report.num_free_device_blocks = self.offload.num_free_device
        report.num_free_host_blocks = self.offload.num_free_host
        return report

    def _grow_blocks(self, active: list[Sequence]) -> list[Sequence]:
        batch = []
        for seq in active:
            missing = blocks_for(seq.num_tokens, self.block_size) - len(seq.block_table)
            if missing > 0:
                ids = self.offload.allocate(missing)
                if ids is None:
                    # The scheduler's accounting should prevent this; skipping the
                    # sequence for one step keeps everyone else correct.
                    logger.error("no free block for %s this step (%d missing)", seq.job_id, missing)
                    continue
                seq.block_table.extend(ids)
            batch.append(seq)
        return batch

    def _append(self, seq: Sequence, token: int) -> JobOutput:
        seq.token_ids.append(token)
        seq.num_generated += 1
        reason = None
        if token in seq.sampling.stop_token_ids or (
                not seq.sampling.ignore_eos and token == self.eos_token_id):
            reason = FinishReason.STOP
        elif seq.num_generated >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        output = JobOutput(seq.job_id, [token], reason, seq.num_tokens)
        if reason is not None:
            self._release(seq)
            del self.seqs[seq.job_id]
        return output

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.seqs.values() if not s.paused)

    @property
    def num_paused(self) -> int:
        return sum(1 for s in self.seqs.values() if s.paused)
