"""A worker without a model, for the simulator and the core's tests.

It carries out the same commands as ``alise.worker.engine.WorkerEngine`` with the same
block arithmetic and the same real ``BlockAllocator``, but instead of running a forward
pass it emits token 0 and ends each job at its target output length (or its max_tokens).
Step time comes from a ``LatencyModel``: the result is a simulation and says so. KV moves
(quantize, swap, prefetch) follow the real worker's block arithmetic and add their copy and
compute time on a virtual clock (``alise.sim.virtual_kv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alise.core.blocks import blocks_for
from alise.core.commands import (
    Abort,
    Admit,
    Command,
    JobOutput,
    Pause,
    Refusal,
    Resume,
    StepReport,
)
from alise.core.job import FinishReason, KvPlace
from alise.core.latency_model import LatencyModel
from alise.sim.virtual_kv import VirtualKvStore
from alise.worker.block_allocator import BlockAllocator


@dataclass
class VirtualSeq:
    job_id: str
    num_tokens: int
    num_generated: int
    max_tokens: int
    target_tokens: int
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    paused: bool = False
    host_blocks: list[int] = field(default_factory=list)
    place: KvPlace = KvPlace.DEVICE
    ready_at_s: float = 0.0


class VirtualWorker:
    def __init__(self, *, num_device_blocks: int, block_size: int, max_model_len: int,
                 latency: LatencyModel, num_host_blocks: int = 0,
                 target_lengths: dict[str, int] | None = None, block_bytes: int = 0,
                 swap_bytes_per_s: float = 20e9, quantize_bytes_per_s: float = 200e9) -> None:
        self.allocator = BlockAllocator(num_device_blocks)
        self.block_size = block_size
        # Same rule as the real engine: no sequence outgrows the whole cache.
        self.max_model_len = min(max_model_len, num_device_blocks * block_size)
        self.latency = latency
        self.num_host_blocks = num_host_blocks
        self.kv = VirtualKvStore(self.allocator, block_size, num_host_blocks, block_bytes,
                                 swap_bytes_per_s, quantize_bytes_per_s)
        self.target_lengths = target_lengths if target_lengths is not None else {}
        self.seqs: dict[str, VirtualSeq] = {}

    def apply(self, commands: list[Command]) -> list[Refusal]:
        refused = []
        for command in commands:
            reason = self._apply_one(command)
            if reason:
                refused.append(Refusal(command.job_id, type(command).__name__.lower(), reason))
        return refused

    def _apply_one(self, command: Command) -> str | None:
        if isinstance(command, Admit):
            if command.job_id in self.seqs:
                return "already admitted"
            target = self.target_lengths.get(command.job_id, command.sampling.max_tokens)
            self.seqs[command.job_id] = VirtualSeq(
                command.job_id, len(command.token_ids), command.num_generated,
                command.sampling.max_tokens, target)
            return None
        seq = self.seqs.get(command.job_id)
        if seq is None:
            return None if isinstance(command, Abort) else "unknown job"
        if isinstance(command, Abort):
            self._release(seq)
            del self.seqs[seq.job_id]
        elif isinstance(command, Pause):
            seq.paused = True  # the pause always happens; only its KV move may be refused
            return self.kv.pause(seq, command.action)
        elif isinstance(command, Resume):
            reason = self.kv.resume(seq)
            seq.paused = reason is not None
            return reason
        return None

    @property
    def num_free_host_blocks(self) -> int:
        return self.kv.num_free_host

    def _release(self, seq: VirtualSeq) -> None:
        self.kv.release(seq)

    def step(self, step_id: int) -> StepReport:
        report = StepReport(step_id=step_id)
        prefill_lens = []
        context = 0
        batch = []
        for seq in self.seqs.values():
            if seq.paused:
                continue
            missing = blocks_for(seq.num_tokens, self.block_size) - len(seq.blocks)
            if missing > 0:
                ids = self.kv.allocate(missing)
                if ids is None:
                    raise RuntimeError(f"plan overcommitted blocks: {seq.job_id} lacks {missing}")
                seq.blocks.extend(ids)
            batch.append(seq)
        start_s = self.kv.step_start_s(max((seq.ready_at_s for seq in batch), default=0.0))
        for seq in batch:
            fed = seq.num_tokens - seq.num_cached
            if fed > 1:
                prefill_lens.append(fed)
                report.num_prefill_tokens += fed
            else:
                report.num_decode_tokens += 1
            context += seq.num_tokens
            seq.num_cached = seq.num_tokens
            report.outputs.append(self._append(seq))
        if batch:
            report.step_duration_s = self.kv.finish_step(
                start_s, self.latency.step_s(len(batch), context, prefill_lens))
        report.num_free_device_blocks = self.kv.num_free_device
        report.num_free_host_blocks = self.num_free_host_blocks
        return report

    def _append(self, seq: VirtualSeq) -> JobOutput:
        seq.num_tokens += 1
        seq.num_generated += 1
        reason = None
        if seq.num_generated >= seq.target_tokens:
            reason = FinishReason.STOP if seq.target_tokens < seq.max_tokens else FinishReason.LENGTH
        elif seq.num_generated >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        out = JobOutput(seq.job_id, [0], reason, seq.num_tokens)
        if reason is not None:
            self._release(seq)
            del self.seqs[seq.job_id]
        return out
