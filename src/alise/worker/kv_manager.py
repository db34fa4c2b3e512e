"""The worker's KV state machine: block ids, host blocks and the moves of paused jobs.

Mechanism only: the scheduler's memory planner decides; this carries out a command or
refuses it whole (a refused command changes nothing). Which transitions exist is the one
table of ``alise.core.kv_places``; what a place costs in blocks is ``alise.core.blocks``
(the scheduler counts by the same formulas). The bytes are moved by a :class:`KvMover`:
``alise.worker.model.kv_offload.TorchKvMover`` on a real worker, ``alise.tools.sim.virtual_kv`` in the
simulator, which therefore runs this very code. No torch here.

Timing rules the movers implement:

* a swap-out takes host blocks at once and keeps its device blocks allocated until the copy
  has landed, but reports them free (the scheduler counts them free): an allocation that
  needs them waits for the copy;
* a swap-in takes device blocks at once, frees the host blocks, and the next step that runs
  the job waits (on the device, not the host) for the copy;
* quantizing keeps the first ``quantized_blocks(full, bits)`` of a job's blocks and frees the
  rest; a resume of a quantized job allocates the difference and dequantizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from alise.core.blocks import QUANTIZED_FRACTION, blocks_for, quantized_blocks
from alise.core.commands import KvAction
from alise.core.job import KvPlace
from alise.core.kv_places import PLACES, QUANTIZED_AT, KvMoveRefused, pause_target
from alise.worker.block_allocator import BlockAllocator


class Ready(Protocol):
    """A copy in flight."""

    def done(self) -> bool: ...

    def wait(self) -> None:
        """Blocks the caller (host) until the copy has landed."""


class KvMover(Protocol):
    """Moves KV bytes (or time) for :class:`KvManager`; validates nothing."""

    def quantize_refusal(self, bits: int) -> str | None:
        """Why KV cannot be quantized to ``bits`` here (None: it can)."""

    def quantize(self, table: list[int], num_full: int, keep: int, from_bits: int, to_bits: int) -> None:
        """Encodes ``num_full`` blocks' worth of KV behind ``table`` into its first ``keep`` blocks."""

    def dequantize(self, kept: list[int], table: list[int], num_full: int, bits: int) -> None:
        """Decodes the stream in ``kept`` into full precision across ``table``."""

    def copy_out(self, device_ids: list[int], host_ids: list[int]) -> Ready | None:
        """Device -> host; None when done on return."""

    def copy_in(self, host_ids: list[int], device_ids: list[int]) -> Ready | None:
        """Host -> device; None when done on return."""

    def wait_ready(self, ready: Ready) -> None:
        """The next model step waits for ``ready`` (on the device)."""


@dataclass
class KvState:
    """Where one sequence's KV is (the engine's ``Sequence`` carries these fields)."""

    place: KvPlace = KvPlace.DEVICE
    block_table: list[int] = field(default_factory=list)
    host_blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    ready: Ready | None = None


class KvManager:
    """Device and host blocks of one engine, and the KV moves of its paused sequences."""

    def __init__(self, num_blocks: int, num_host_blocks: int, block_size: int, mover: KvMover) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.host_allocator = BlockAllocator(num_host_blocks) if num_host_blocks else None
        self.num_host_blocks = num_host_blocks
        self.block_size = block_size
        self.mover = mover
        #: Swap-outs in flight: (ready, device block ids still being read).
        self.pending_out: list[tuple[Ready, list[int]]] = []

    # ----------------------------------------------------------------- accounting

    @property
    def num_free_device(self) -> int:
        """Free device blocks as the scheduler counts them (swap-outs in flight included)."""
        return self.allocator.num_free + sum(len(ids) for _, ids in self.pending_out)

    @property
    def num_free_host(self) -> int:
        return self.host_allocator.num_free if self.host_allocator else 0

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Device blocks; waits for in-flight swap-outs only when the free list is short."""
        self.reclaim()
        while not self.allocator.can_allocate(num_blocks) and self.pending_out:
            ready, ids = self.pending_out.pop(0)
            ready.wait()
            self.allocator.free(ids)
        return self.allocator.allocate(num_blocks)

    def reclaim(self) -> None:
        while self.pending_out and self.pending_out[0][0].done():
            self.allocator.free(self.pending_out.pop(0)[1])

    def drain(self) -> None:
        """Waits for every swap-out (tests, shutdown)."""
        while self.pending_out:
            ready, ids = self.pending_out.pop(0)
            ready.wait()
            self.allocator.free(ids)

    # ----------------------------------------------------------------- commands

    def pause(self, seq: KvState, action: KvAction) -> str | None:
        """Applies a KV action to a paused sequence; a refusal leaves it untouched."""
        try:
            target = pause_target(seq.place, action)
        except KvMoveRefused as exc:
            return str(exc)
        if target is seq.place:
            return None
        if target is KvPlace.NONE:
            self.release(seq)
            return None
        if action is KvAction.KEEP:
            return self._swap_in(seq)
        if action is KvAction.SWAP_TO_HOST:
            return self._swap_out(seq)
        return self._quantize(seq, PLACES[target].bits)

    def resume(self, seq: KvState) -> str | None:
        """Back to full precision on the device (swap-in, then dequantize), or refuse whole."""
        full = blocks_for(seq.num_cached, self.block_size)
        held = len(seq.block_table) if PLACES[seq.place].on_device else 0
        need = full - held if seq.place is not KvPlace.NONE else 0
        if need > self.num_free_device:
            return f"no free device blocks to resume: {need} needed, {self.num_free_device} free"
        if PLACES[seq.place].on_host:
            self._swap_in(seq)
        bits = PLACES[seq.place].bits
        if PLACES[seq.place].on_device and bits < 16 and full:
            self.wait_ready([seq])
            extra = self.allocate(full - len(seq.block_table))
            table = seq.block_table + extra
            self.mover.dequantize(seq.block_table, table, full, bits)
            seq.block_table = table
        seq.place = KvPlace.DEVICE
        return None

    def release(self, seq: KvState) -> None:
        self.wait_ready([seq])  # the compute stream must not reuse blocks a copy still fills
        self.allocator.free(seq.block_table)
        if seq.host_blocks:
            self.host_allocator.free(seq.host_blocks)
        seq.block_table, seq.host_blocks = [], []
        seq.num_cached = 0
        seq.place = KvPlace.NONE

    def wait_ready(self, seqs) -> None:
        """The next step waits for the swap-ins of ``seqs`` (on the device: no host sync)."""
        for seq in seqs:
            if seq.ready is not None:
                self.mover.wait_ready(seq.ready)
                seq.ready = None

    # ----------------------------------------------------------------- moves

    def _quantize(self, seq: KvState, bits: int) -> str | None:
        reason = self.mover.quantize_refusal(bits)
        if reason is not None:
            num, den = QUANTIZED_FRACTION[bits]
            return f"{reason} (int{bits} must fit in {num}/{den} of the blocks)"
        self.wait_ready([seq])
        full = blocks_for(seq.num_cached, self.block_size)
        keep = quantized_blocks(full, bits)
        if full:
            self.mover.quantize(seq.block_table, full, keep, PLACES[seq.place].bits, bits)
            self.allocator.free(seq.block_table[keep:])
            seq.block_table = seq.block_table[:keep]
        seq.place = QUANTIZED_AT[bits]
        return None

    def _swap_out(self, seq: KvState) -> str | None:
        count = len(seq.block_table)
        host = self.host_allocator.allocate(count) if self.host_allocator else None
        if host is None:
            return f"host pool full: {count} blocks needed, {self.num_free_host} free"
        self.wait_ready([seq])
        ready = self.mover.copy_out(seq.block_table, host)
        if ready is None:
            self.allocator.free(seq.block_table)
        else:
            self.pending_out.append((ready, seq.block_table))
        seq.block_table, seq.host_blocks = [], host
        seq.place = PLACES[seq.place].host
        return None

    def _swap_in(self, seq: KvState) -> str | None:
        count = len(seq.host_blocks)
        device = self.allocate(count)
        if device is None:
            return f"no free device blocks for {count} swapped-in blocks"
        seq.ready = self.mover.copy_in(seq.host_blocks, device)
        self.host_allocator.free(seq.host_blocks)
        seq.block_table, seq.host_blocks = device, []
        seq.place = PLACES[seq.place].device
        return None
