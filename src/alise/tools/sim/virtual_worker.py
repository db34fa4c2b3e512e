"""A worker without a model, for the simulator and the core's tests.

It is the worker's own engine (``alise.worker.engine.WorkerEngine``: the same commands, block
arithmetic, chunked feeds and finishing rules) over the worker's own KV manager, with a
:class:`LatencyExecutor` for the forward pass and a virtual KV mover
(``alise.tools.sim.virtual_kv``) for the copies. A step lasts what a ``LatencyModel`` says, plus the
KV moves' stalls and compute; its tokens are 0, except that a job with a target length (a
test's ``target_lengths``) emits the end-of-sequence token there. The result is a simulation
and says so.
"""

from __future__ import annotations

from alise.core.latency_model import LatencyModel
from alise.tools.sim.virtual_kv import VirtualKvMover
from alise.worker.engine import Feed, WorkerEngine
from alise.worker.kv_manager import KvManager

#: The virtual model's vocabulary and end-of-sequence token.
VOCAB_SIZE = 1 << 20
EOS_TOKEN_ID = VOCAB_SIZE - 1


class LatencyExecutor:
    vocab_size = VOCAB_SIZE

    def __init__(self, latency: LatencyModel, mover: VirtualKvMover,
                 target_lengths: dict[str, int] | None = None) -> None:
        self.latency = latency
        self.mover = mover
        self.target_lengths = target_lengths if target_lengths is not None else {}

    def make_generator(self, seed: int) -> None:
        return None

    def release(self, job_id: str) -> None:
        pass

    def execute(self, feeds: list[Feed]) -> tuple[list[int], float, None]:
        lens = [f.num_tokens for f in feeds if f.num_tokens > 1]
        starts = [f.start for f in feeds if f.num_tokens > 1]
        context = sum(f.start + f.num_tokens for f in feeds)
        duration = self.mover.run_step(self.latency.step_s(len(feeds), context, lens, starts))
        tokens = []
        for f in feeds:
            if f.samples:
                target = self.target_lengths.get(f.seq.job_id)
                tokens.append(EOS_TOKEN_ID if target is not None and f.seq.num_generated + 1 >= target else 0)
        return tokens, duration, None


def virtual_worker(*, num_device_blocks: int, block_size: int, max_model_len: int,
                   latency: LatencyModel, num_host_blocks: int = 0,
                   target_lengths: dict[str, int] | None = None, block_bytes: int = 0,
                   swap_bytes_per_s: float = 20e9, quantize_bytes_per_s: float = 200e9,
                   prefix_caching: bool = False) -> WorkerEngine:
    """A worker engine with a latency-model executor and a virtual KV mover."""
    mover = VirtualKvMover(block_bytes, swap_bytes_per_s, quantize_bytes_per_s)
    kv = KvManager(num_device_blocks, num_host_blocks, block_size, mover, prefix_caching=prefix_caching)
    executor = LatencyExecutor(latency, mover, target_lengths)
    return WorkerEngine(executor, kv, eos_token_id=EOS_TOKEN_ID, max_model_len=max_model_len)
