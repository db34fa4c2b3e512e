"""KV moves on a virtual clock: the simulator's ``KvMover`` (``alise.worker.kv_manager``).

The worker's own KV manager runs the commands (the same places and transitions, those of
``alise.core.kv_places.PLACES``, the same block ids, the same refusals); this mover moves no
bytes and keeps time instead:

* copies (swap-out, swap-in) queue on one copy engine at ``swap_bytes_per_s``; a swap-out's
  device blocks stay allocated until its copy lands (exactly like the CUDA side stream), and
  an allocation that needs them earlier stalls the next step until then;
* a step that runs a swapped-in job starts no earlier than its copy lands;
* quantizing and dequantizing cost compute time (``quantize_bytes_per_s``), charged to the
  next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class VirtualReady:
    """A copy that lands at ``landing_s`` on its mover's clock."""

    def __init__(self, mover: VirtualKvMover, landing_s: float) -> None:
        self.mover = mover
        self.landing_s = landing_s

    def done(self) -> bool:
        return self.landing_s <= self.mover.clock_s

    def wait(self) -> None:
        self.mover.stall_until_s = max(self.mover.stall_until_s, self.landing_s)


@dataclass
class VirtualKvMover:
    #: Bytes of one full-precision block; 0 makes every move free of time.
    block_bytes: int = 0
    swap_bytes_per_s: float = 20e9
    quantize_bytes_per_s: float = 200e9
    clock_s: float = 0.0
    copy_free_at_s: float = 0.0
    #: Extra compute (quantize / dequantize) to add to the next step.
    compute_debt_s: float = 0.0
    #: The next step cannot start before this (it waited for a swap-out's blocks).
    stall_until_s: float = 0.0
    #: The next step cannot start before this (a swap-in it runs lands then).
    ready_at_s: float = 0.0
    moved_bytes: dict[str, int] = field(default_factory=lambda: {"out": 0, "in": 0})

    def quantize_refusal(self, bits: int) -> str | None:
        return None

    def quantize(self, table, num_full: int, keep: int, from_bits: int, to_bits: int) -> None:
        self._charge_compute(num_full)

    def dequantize(self, kept, table, num_full: int, bits: int) -> None:
        self._charge_compute(num_full)

    def copy_out(self, device_ids, host_ids) -> VirtualReady:
        return VirtualReady(self, self._copy(len(device_ids), "out"))

    def copy_in(self, host_ids, device_ids) -> VirtualReady:
        return VirtualReady(self, self._copy(len(device_ids), "in"))

    def wait_ready(self, ready: VirtualReady) -> None:
        self.ready_at_s = max(self.ready_at_s, ready.landing_s)

    def _copy(self, num_blocks: int, direction: str) -> float:
        num_bytes = num_blocks * self.block_bytes
        self.moved_bytes[direction] += num_bytes
        start = max(self.clock_s, self.copy_free_at_s)
        self.copy_free_at_s = start + num_bytes / self.swap_bytes_per_s
        return self.copy_free_at_s

    def _charge_compute(self, num_full_blocks: int) -> None:
        self.compute_debt_s += num_full_blocks * self.block_bytes / self.quantize_bytes_per_s

    def run_step(self, compute_s: float) -> float:
        """Advances the clock past a step of ``compute_s``; returns its duration as a worker
        would report it (stalls and quantization work included)."""
        start = max(self.clock_s, self.stall_until_s, self.ready_at_s)
        duration = (start - self.clock_s) + self.compute_debt_s + compute_s
        self.clock_s += duration
        self.compute_debt_s = 0.0
        self.ready_at_s = 0.0
        return duration
