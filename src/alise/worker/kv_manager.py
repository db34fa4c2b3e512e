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

Prefix caching (``prefix_caching``; the allocator is ``alise.core.prefix_cache.PrefixCache``):

* an admit names how many leading tokens the scheduler found cached (``start``): the sequence
  takes a reference to exactly those blocks (never more, so its blocks are what the
  scheduler's mirror counts) and computes from there;
* a prefix no longer all here (the mirror releases a job that ended early here a step or two
  after this worker did, which can change what the LRU evicts) is taken as far as it is
  cached, and private *stand-in* blocks take the place of the rest: the sequence holds the
  blocks and counts the computed tokens the scheduler counts, and its next feed starts at the
  first stand-in (``num_missing`` tokens earlier than the plan's chunk says), so the plans
  need not know. The step's report counts them (``StepReport.num_admit_stand_in_tokens``,
  ``num_resume_stand_in_tokens``): the scheduler counts them computed, not cached. Computed,
  the stand-ins are named by their chain hashes, as the mirror's blocks are;
* a sequence's table is its shared prefix (``num_shared_blocks``, cached blocks others may
  read) followed by its private blocks. Every KV action moves only the private blocks:
  int8 / int4 / swap leave the shared prefix on the device at full precision, read-only,
  referenced by the paused sequence; a drop or a release gives up the references. So a pause
  never writes into, frees or moves a block another sequence reads (skip, not copy-on-write:
  a copy would cost the device blocks the move is meant to free);
* on release the sequence's full blocks (``reusable_tokens``) are named by their chain hash
  and kept, free, in the cache's LRU until reused or evicted; a drop keeps those of the
  tokens the scheduler knew when it planned it (``Pause.num_reusable_tokens``), so the resume
  of a dropped sequence takes them back (``Resume.num_cached_tokens``) as an admit does;
* an allocation takes uncached free blocks, then the blocks of landed swap-outs, then waits
  for swap-outs in flight, and only then evicts cached blocks: the scheduler's mirror counts a
  swapped-out job's blocks free at once, so evicting before the copy lands would evict what
  the mirror still holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from alise.core.blocks import QUANTIZED_FRACTION, blocks_for, quantized_blocks
from alise.core.commands import KvAction
from alise.core.job import KvPlace
from alise.core.kv_places import PLACES, QUANTIZED_AT, KvMoveRefused, pause_target
from alise.core.prefix_cache import chain_hashes, reusable_tokens
from alise.worker.block_allocator import BlockAllocator

logger = logging.getLogger(__name__)


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
    #: The sequence's tokens (their chain hashes name its full blocks).
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    host_blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    ready: Ready | None = None
    #: Leading blocks of ``block_table`` taken from the prefix cache (shared, read-only), and
    #: the stand-ins of any of them it lacked: every KV move leaves them on the device.
    num_shared_blocks: int = 0
    #: Tokens the admit gave (what the scheduler knows the values of, ``reusable_tokens``).
    num_admitted: int = 0
    #: Tokens just before ``num_cached`` with no K/V here yet (stand-ins of a prefix the cache
    #: lacked, see the module doc): the next feed computes them first.
    num_missing: int = 0


class KvManager:
    """Device and host blocks of one engine, and the KV moves of its paused sequences."""

    def __init__(self, num_blocks: int, num_host_blocks: int, block_size: int, mover: KvMover, *,
                 prefix_caching: bool = False) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_caching = prefix_caching
        self.host_allocator = BlockAllocator(num_host_blocks) if num_host_blocks else None
        self.num_host_blocks = num_host_blocks
        self.block_size = block_size
        self.mover = mover
        #: Swap-outs in flight: (ready, device block ids still being read).
        self.pending_out: list[tuple[Ready, list[int]]] = []
        #: Tokens of prefixes the scheduler counted cached and this cache lacked (stand-ins,
        #: computed in the sequences' next feeds), ever: of admits, and of resumes after drops.
        self.num_admit_missing_tokens = 0
        self.num_resume_missing_tokens = 0

    # ----------------------------------------------------------------- accounting

    @property
    def num_free_device(self) -> int:
        """Free device blocks as the scheduler counts them (swap-outs in flight included)."""
        return self.allocator.num_free + sum(len(ids) for _, ids in self.pending_out)

    @property
    def num_missing_tokens(self) -> int:
        return self.num_admit_missing_tokens + self.num_resume_missing_tokens

    @property
    def num_free_host(self) -> int:
        return self.host_allocator.num_free if self.host_allocator else 0

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Device blocks; waits for in-flight swap-outs only when the uncached free list is short
        (then evicts cached blocks: see the module doc)."""
        self.reclaim()
        while self.allocator.num_uncached_free < num_blocks and self.pending_out:
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

    def pause(self, seq: KvState, action: KvAction, num_reusable_tokens: int = 0) -> str | None:
        """Applies a KV action to a paused sequence; a refusal leaves it untouched. A drop caches
        the full blocks of the first ``num_reusable_tokens`` it computed (at least its admitted
        tokens')."""
        try:
            target = pause_target(seq.place, action)
        except KvMoveRefused as exc:
            return str(exc)
        if target is seq.place:
            return None
        if target is KvPlace.NONE:
            self.release(seq, num_known=num_reusable_tokens)
            return None
        if action is KvAction.KEEP:
            return self._swap_in(seq)
        if action is KvAction.SWAP_TO_HOST:
            return self._swap_out(seq)
        return self._quantize(seq, PLACES[target].bits)

    def start(self, seq: KvState, num_cached_tokens: int) -> str | None:
        """A new sequence (its ``token_ids`` the admitted tokens) whose first
        ``num_cached_tokens`` the scheduler found cached: takes those blocks, or refuses."""
        seq.num_admitted = len(seq.token_ids)
        reason = self._take_prefix(seq, num_cached_tokens)
        if reason is None:
            self.num_admit_missing_tokens += seq.num_missing
        return reason

    def _take_prefix(self, seq: KvState, num_cached_tokens: int) -> str | None:
        """A sequence with no blocks takes the cached blocks of its first ``num_cached_tokens``."""
        token_ids = seq.token_ids
        if not num_cached_tokens:
            return None
        bs = self.block_size
        if not self.prefix_caching:
            return f"{num_cached_tokens} cached tokens asked of a worker without prefix caching"
        if num_cached_tokens % bs or not 0 < num_cached_tokens < len(token_ids):
            return (f"{num_cached_tokens} cached tokens: must be whole blocks of {bs} and fewer than "
                    f"the {len(token_ids)} tokens")
        num_blocks = num_cached_tokens // bs
        ids = self.allocator.match(chain_hashes(token_ids, bs, num_blocks))
        num_stand_ins = num_blocks - len(ids)
        # Acquiring takes the cached free blocks of ``ids`` out of the free blocks.
        num_free = self.num_free_device - sum(1 for b in ids if not self.allocator.refs(b))
        if num_stand_ins > num_free:
            return (f"prefix of {num_cached_tokens} tokens not cached here ({len(ids) * bs} are), "
                    f"no free device blocks for the rest: {num_stand_ins} needed, {num_free} free")
        self.allocator.acquire(ids)
        if num_stand_ins:
            logger.info("prefix of %d tokens: %d cached here, %d recomputed", num_cached_tokens,
                        len(ids) * bs, num_stand_ins * bs)
            ids = ids + self.allocate(num_stand_ins)
        seq.block_table, seq.num_shared_blocks, seq.num_cached = ids, num_blocks, num_cached_tokens
        seq.num_missing = num_stand_ins * bs
        return None

    def fill(self, seq: KvState) -> None:
        """The sequence's stand-ins are computed (or queued to be, ahead of any step that may
        read them): they are named by their chain hashes, as cached blocks. A stand-in whose
        name another block took meanwhile (another sequence computed the same lacking prefix
        first) gives way to that block, so a shared prefix is always cached blocks."""
        n, table = seq.num_shared_blocks, seq.block_table
        hashes = chain_hashes(seq.token_ids, self.block_size, n)
        twins = [(i, b) for i, b in enumerate(self.allocator.match(hashes)) if b != table[i]]
        if twins:
            self.allocator.acquire([b for _, b in twins])
            self.allocator.free([table[i] for i, _ in twins])
            for i, b in twins:
                table[i] = b
        self.allocator.register(table[:n], hashes)
        seq.num_missing = 0

    def resume(self, seq: KvState, num_cached_tokens: int = 0) -> str | None:
        """Back to full precision on the device (swap-in, then dequantize), or refuse whole; a
        dropped sequence takes the cached blocks of its first ``num_cached_tokens``."""
        if seq.place is KvPlace.NONE:
            reason = self._take_prefix(seq, num_cached_tokens)
            if reason is None:
                seq.place = KvPlace.DEVICE
                self.num_resume_missing_tokens += seq.num_missing
            return reason
        if num_cached_tokens:
            return f"{num_cached_tokens} cached tokens asked of a resume with its KV held ({seq.place.value})"
        full = blocks_for(seq.num_cached, self.block_size)
        # The table holds the shared prefix wherever the private blocks are.
        need = full - len(seq.block_table)
        if need > self.num_free_device:
            return f"no free device blocks to resume: {need} needed, {self.num_free_device} free"
        if PLACES[seq.place].on_host:
            self._swap_in(seq)
        bits = PLACES[seq.place].bits
        shared = seq.num_shared_blocks
        if PLACES[seq.place].on_device and bits < 16 and full > shared:
            self.wait_ready([seq])
            kept = seq.block_table[shared:]
            extra = self.allocate(full - len(seq.block_table))
            self.mover.dequantize(kept, kept + extra, full - shared, bits)
            seq.block_table = seq.block_table + extra
        seq.place = KvPlace.DEVICE
        return None

    def release(self, seq: KvState, *, finished: bool = False, num_known: int = 0) -> None:
        """Frees the sequence's blocks; with prefix caching, its full blocks
        (``reusable_tokens`` of its admitted tokens, or of ``num_known`` where more) at full
        precision on the device are kept in the cache first."""
        self.wait_ready([seq])  # the compute stream must not reuse blocks a copy still fills
        if self.prefix_caching and seq.place is KvPlace.DEVICE:
            known = max(seq.num_admitted, num_known)
            n = reusable_tokens(seq.num_cached - seq.num_missing, known, finished) // self.block_size
            self.allocator.register(seq.block_table[:n], chain_hashes(seq.token_ids, self.block_size, n))
        self.allocator.free(seq.block_table)
        if seq.host_blocks:
            self.host_allocator.free(seq.host_blocks)
        seq.block_table, seq.host_blocks = [], []
        seq.num_cached = seq.num_shared_blocks = seq.num_missing = 0
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
        shared = seq.num_shared_blocks
        private = seq.block_table[shared:]
        full = blocks_for(seq.num_cached, self.block_size) - shared
        keep = quantized_blocks(full, bits)
        if full:
            self.mover.quantize(private, full, keep, PLACES[seq.place].bits, bits)
            self.allocator.free(private[keep:])
            seq.block_table = seq.block_table[:shared + keep]
        seq.place = QUANTIZED_AT[bits]
        return None

    def _swap_out(self, seq: KvState) -> str | None:
        shared = seq.num_shared_blocks
        private = seq.block_table[shared:]
        count = len(private)
        host = self.host_allocator.allocate(count) if self.host_allocator else None
        if host is None:
            return f"host pool full: {count} blocks needed, {self.num_free_host} free"
        self.wait_ready([seq])
        ready = self.mover.copy_out(private, host)
        if ready is None:
            self.allocator.free(private)
        else:
            self.pending_out.append((ready, private))
        seq.block_table, seq.host_blocks = seq.block_table[:shared], host
        seq.place = PLACES[seq.place].host
        return None

    def _swap_in(self, seq: KvState) -> str | None:
        count = len(seq.host_blocks)
        device = self.allocate(count)
        if device is None:
            return f"no free device blocks for {count} swapped-in blocks"
        seq.ready = self.mover.copy_in(seq.host_blocks, device)
        self.host_allocator.free(seq.host_blocks)
        seq.block_table, seq.host_blocks = seq.block_table + device, []
        seq.place = PLACES[seq.place].device
        return None
