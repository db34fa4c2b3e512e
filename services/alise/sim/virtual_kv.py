"""KV moves of the virtual worker: the same block arithmetic as the real worker, no bytes.

Mirrors ``alise.worker.kv_offload`` + the KV half of ``alise.worker.engine`` on counts and
a virtual clock:

* quantize (int8 / int4) keeps the first ``quantized_blocks(full, bits)`` blocks and frees
  the rest at once; it costs compute time (``quantize_bytes_per_s``), charged to the next step.
* swap-out takes host blocks at once and queues a copy on the one copy engine; the device
  blocks stay allocated until the copy has landed (exactly like the CUDA side stream), but
  are reported free: when a step needs them earlier, it waits for the copy (a stall).
* swap-in (prefetch or resume) frees the host blocks, takes device blocks and queues a copy;
  a step that runs the job starts no earlier than the copy lands.
* resume of a quantized job allocates the difference and dequantizes (compute time).

A command that cannot be honoured (host pool full, no such transition) is refused whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alise.core.blocks import DEVICE_PLACES, HOST_PLACES, QUANTIZED_BITS, blocks_for, quantized_blocks
from alise.core.commands import KvAction
from alise.core.job import KvPlace
from alise.worker.block_allocator import BlockAllocator

_HOST_OF = {KvPlace.DEVICE: KvPlace.HOST, KvPlace.DEVICE_INT8: KvPlace.HOST_INT8,
            KvPlace.DEVICE_INT4: KvPlace.HOST_INT4}
_DEVICE_OF = {host: device for device, host in _HOST_OF.items()}
_QUANTIZED = {8: KvPlace.DEVICE_INT8, 4: KvPlace.DEVICE_INT4}


@dataclass
class VirtualKv:
    """Where one virtual sequence's KV is: device block ids, host block ids, and when usable."""

    place: KvPlace = KvPlace.DEVICE
    blocks: list[int] = field(default_factory=list)
    host_blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    ready_at_s: float = 0.0


@dataclass
class VirtualKvStore:
    allocator: BlockAllocator
    block_size: int
    num_host_blocks: int = 0
    #: Bytes of one full-precision block; 0 makes every move free of time.
    block_bytes: int = 0
    swap_bytes_per_s: float = 20e9
    quantize_bytes_per_s: float = 200e9
    clock_s: float = 0.0
    copy_free_at_s: float = 0.0
    #: Extra compute (quantize/dequantize) to add to the next step.
    compute_debt_s: float = 0.0
    #: The next step cannot start before this (waited for a swap-out's blocks).
    stall_until_s: float = 0.0
    #: (landing time, device block ids) of swap-outs in flight.
    pending_out: list[tuple[float, list[int]]] = field(default_factory=list)
    moved_bytes: dict[str, int] = field(default_factory=lambda: {"out": 0, "in": 0})

    def __post_init__(self) -> None:
        self.host = BlockAllocator(self.num_host_blocks) if self.num_host_blocks else None

    # ----------------------------------------------------------------- counts

    @property
    def num_free_device(self) -> int:
        return self.allocator.num_free + sum(len(ids) for _, ids in self.pending_out)

    @property
    def num_free_host(self) -> int:
        return self.host.num_free if self.host else 0

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Device blocks, waiting for in-flight swap-outs if the free list is short."""
        self._reclaim(self.clock_s)
        while not self.allocator.can_allocate(num_blocks) and self.pending_out:
            landed_s, ids = self.pending_out.pop(0)
            self.allocator.free(ids)
            self.stall_until_s = max(self.stall_until_s, landed_s)
        return self.allocator.allocate(num_blocks)

    def _reclaim(self, now_s: float) -> None:
        while self.pending_out and self.pending_out[0][0] <= now_s:
            self.allocator.free(self.pending_out.pop(0)[1])

    def _copy(self, num_blocks: int, direction: str) -> float:
        num_bytes = num_blocks * self.block_bytes
        self.moved_bytes[direction] += num_bytes
        start = max(self.clock_s, self.copy_free_at_s)
        self.copy_free_at_s = start + num_bytes / self.swap_bytes_per_s
        return self.copy_free_at_s

    def _charge_compute(self, num_full_blocks: int) -> None:
        self.compute_debt_s += num_full_blocks * self.block_bytes / self.quantize_bytes_per_s

    # ----------------------------------------------------------------- commands

    def pause(self, kv: VirtualKv, action: KvAction) -> str | None:
        if action is KvAction.KEEP:
            return self.swap_in(kv) if kv.place in HOST_PLACES else None
        if action is KvAction.DROP:
            self.release(kv)
            return None
        if action is KvAction.SWAP_TO_HOST:
            return self.swap_out(kv)
        return self.quantize(kv, 8 if action is KvAction.QUANTIZE_INT8 else 4)

    def quantize(self, kv: VirtualKv, bits: int) -> str | None:
        if kv.place not in DEVICE_PLACES or QUANTIZED_BITS.get(kv.place, 16) <= bits:
            return f"cannot quantize KV at {kv.place.value} to int{bits}"
        full = blocks_for(kv.num_cached, self.block_size)
        keep = quantized_blocks(full, bits)
        self.allocator.free(kv.blocks[keep:])
        kv.blocks = kv.blocks[:keep]
        kv.place = _QUANTIZED[bits]
        self._charge_compute(full)
        return None

    def swap_out(self, kv: VirtualKv) -> str | None:
        if kv.place not in DEVICE_PLACES:
            return f"cannot swap out KV at {kv.place.value}"
        ids = self.host.allocate(len(kv.blocks)) if self.host else None
        if ids is None:
            return f"host pool full: {len(kv.blocks)} blocks needed, {self.num_free_host} free"
        self.pending_out.append((self._copy(len(kv.blocks), "out"), kv.blocks))
        kv.blocks, kv.host_blocks = [], ids
        kv.place = _HOST_OF[kv.place]
        return None

    def swap_in(self, kv: VirtualKv) -> str | None:
        ids = self.allocate(len(kv.host_blocks))
        if ids is None:
            return f"no free device blocks for {len(kv.host_blocks)} swapped-in blocks"
        self.host.free(kv.host_blocks)
        kv.blocks, kv.host_blocks = ids, []
        kv.place = _DEVICE_OF[kv.place]
        kv.ready_at_s = self._copy(len(ids), "in")
        return None

    def resume(self, kv: VirtualKv) -> str | None:
        """Brings the KV back to full precision on the device, or refuses and changes nothing."""
        full = blocks_for(kv.num_cached, self.block_size)
        held = len(kv.blocks) if kv.place in DEVICE_PLACES else 0
        need = (full - held) if kv.place is not KvPlace.NONE else 0
        if need > self.num_free_device:
            return f"no free device blocks to resume: {need} needed, {self.num_free_device} free"
        if kv.place in HOST_PLACES:
            self.swap_in(kv)
        if kv.place in (KvPlace.DEVICE_INT8, KvPlace.DEVICE_INT4):
            kv.blocks += self.allocate(full - len(kv.blocks))
            kv.place = KvPlace.DEVICE
            self._charge_compute(full)
        if kv.place is KvPlace.NONE:
            kv.place = KvPlace.DEVICE
        return None

    def release(self, kv: VirtualKv) -> None:
        self.allocator.free(kv.blocks)
        if kv.host_blocks:
            self.host.free(kv.host_blocks)
        kv.blocks, kv.host_blocks = [], []
        kv.num_cached = 0
        kv.place = KvPlace.NONE

    # ----------------------------------------------------------------- time

    def step_start_s(self, ready_at_s: float) -> float:
        """When a step over jobs ready at ``ready_at_s`` can start (copies it waits on)."""
        start = max(self.clock_s, self.stall_until_s, ready_at_s)
        self._reclaim(start)
        return start

    def finish_step(self, start_s: float, compute_s: float) -> float:
        """Advances the clock past a step; returns its duration as the worker reports it."""
        duration = (start_s - self.clock_s) + self.compute_debt_s + compute_s
        self.clock_s += duration
        self.compute_debt_s = 0.0
        return duration
