"""A worker whose steps last what a GPU's latency profile says: the serving path at GPU pace, on a CPU.

The real worker service (``alise.worker.service.Worker``: its stream to the scheduler, its step
thread, the worker engine and KV manager, its step log) over a model step that sleeps for the
profile's time of that step's shape (``LatencyModel.step_s``: sequences, context, prompt chunks)
and samples each token uniformly from the model's vocabulary (random weights' tokens, about
39 % of which have no text in the MiniLM tokenizer). It brings the profile to the scheduler as a
real worker does with ``--latency-profile``, so the prefill-step cap is on.

bench/gpu/peer_vllm.sh starts it in place of the real worker when ``VIRTUAL=PROFILE`` is set:
the scheduler, the HTTP door and vLLM's client then run as on the GPU machine, and the
difference from ``bench/gpu/peer_sim.py`` on the same profile and trace is what the serving
path (plans, streams, the door, the client) adds to the scheduling.

    python bench/gpu/peer_virtual.py --scheduler 127.0.0.1:50052 --profile profiles/opt-13b-h100.json \
        --num-device-blocks 938 --max-num-seqs 64 [--scale 1.0] [--health-address A] [--step-log F]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scheduler", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--model", default="opt-13b", help="the preset the scheduler serves (its fingerprint)")
    p.add_argument("--num-device-blocks", type=int, default=938)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--health-address", default="")
    p.add_argument("--step-log", default="")
    p.add_argument("--worker-id", default="virtual-0")
    p.add_argument("--scale", type=float, default=1.0, help="factor on every step's time (a faster or slower engine)")
    args = p.parse_args()
    asyncio.run(serve(args))
    return 0


async def serve(args) -> None:
    from alise.core.latency_model import LatencyModel
    from alise.modelinfo.identity import ModelIdentity
    from alise.modelinfo.source import resolve_model
    from alise.tools.sim.virtual_worker import LatencyExecutor, virtual_worker
    from alise.worker.config import WorkerConfig
    from alise.worker.service import Worker

    latency = LatencyModel.load(args.profile)
    model = resolve_model(args.model)
    vocab = model.count("vocab_size")
    rng = random.Random(0)

    class ProfiledExecutor(LatencyExecutor):
        """Sleeps for the profile's step time; tokens uniform over the vocabulary."""

        vocab_size = vocab

        def execute(self, feeds):
            started = time.perf_counter()
            lens = [f.num_tokens for f in feeds if f.num_tokens > 1]
            starts = [f.start for f in feeds if f.num_tokens > 1]
            context = sum(f.start + f.num_tokens for f in feeds)
            time.sleep(args.scale * latency.step_s(len(feeds), context, lens, starts))
            tokens = [rng.randrange(vocab) for f in feeds if f.samples]
            return tokens, time.perf_counter() - started, None

    engine = virtual_worker(num_device_blocks=args.num_device_blocks, block_size=16,
                            max_model_len=args.max_model_len, latency=latency)
    engine.executor = ProfiledExecutor(latency, engine.executor.mover)
    identity = ModelIdentity(model.name, "virtual", vocab, 0, model.model_id)
    worker = Worker(WorkerConfig(scheduler_address=args.scheduler, worker_id=args.worker_id,
                                 health_address=args.health_address, max_num_seqs=args.max_num_seqs,
                                 max_model_len=args.max_model_len, step_log=args.step_log),
                    engine=engine, identity=identity)
    worker.latency_model = latency
    sys.setswitchinterval(0.0005)  # as `alise worker` does
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.stop()))
    await worker.start_health()
    await worker.load()
    try:
        await worker.run()
    finally:
        worker.close()


if __name__ == "__main__":
    raise SystemExit(main())
