"""Digest of every scheduling decision, to check that an optimization of the core changes none.

    python bench/sched_decisions.py --trace T.jsonl [--trace ...] [--out digests.json]

Replays each trace through the simulator (``alise.sim.simulator.simulate``, the real
``SchedulerCore``) for fcfs, alise and oracle, at a few rates, with one worker and no host
memory (the ``alise sim`` set-up) and with two workers and host memory (routing, swaps and
prefetches), and also the ``bench/sched_overhead.py`` scenario (256 running, ~1,000 queued).
Every ``StepPlan`` the core returns (step id, commands in order, run flag, step jobs, with the
virtual time it was planned at) is hashed; so are the core's KV-move and preemption counters
and every job's record. Two versions of the core decide identically iff the digests match.
alise's estimates come from the trace's cached cross-fitted estimates when present
(``<trace>.estimates-auto.json``, written by ``alise sim``), else from a seeded noisy copy
of the true lengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import random
import sys
from pathlib import Path

from alise.core.blocks import WorkerCapacity
from alise.core.job import LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.policy import make_policy
from alise.core.scheduler import SchedulerCore
from alise.sim import simulator as sim_mod
from alise.sim.trace import read_trace, rescale

_state: dict = {}


def _install_hook() -> None:
    original = SchedulerCore.schedule

    def schedule(self, worker_id, now_s):
        plan = original(self, worker_id, now_s)
        h = _state["hash"]
        h.update(repr((worker_id, now_s, plan.step_id, plan.commands, plan.run_step,
                       sorted(plan.step_jobs.items()))).encode())
        _state["steps"] += 1
        _state["core"] = self
        return plan

    SchedulerCore.schedule = schedule


@dataclasses.dataclass(frozen=True)
class _HostConfig(sim_mod.SimConfig):
    num_host_blocks: int = 0

    def capacity(self, worker_id: str) -> WorkerCapacity:
        return WorkerCapacity(worker_id, self.block_size, self.num_device_blocks,
                              self.num_host_blocks, self.max_model_len, self.max_num_seqs,
                              self.max_num_batched_tokens, block_bytes=1 << 20)


def _estimates(path: str, requests) -> dict[int, LengthEstimate]:
    cache = Path(f"{path}.estimates-auto.json")
    if cache.is_file():
        by_id = {pid: LengthEstimate(**e)
                 for pid, e in json.loads(cache.read_text())["estimates"].items()}
        if all(r.id in by_id for r in requests):
            return {i: by_id[r.id] for i, r in enumerate(requests)}
    rng = random.Random(0)
    out = {}
    for i, r in enumerate(requests):
        pred = max(1.0, r.output_tokens * rng.lognormvariate(0, 0.6))
        out[i] = LengthEstimate(pred, pred, pred * 1.8, "noisy-truth")
    return out


def _run(label: str, fn) -> dict:
    _state.update(hash=hashlib.sha256(), steps=0, core=None)
    records = fn()
    core = _state["core"]
    h = _state["hash"]
    h.update(repr(sorted(core.kv_moves.items())).encode())
    h.update(repr(sorted(core.preemptions.items())).encode())
    h.update(repr(records).encode())
    return dict(case=label, plans=_state["steps"], kv_moves=dict(sorted(core.kv_moves.items())),
                preemptions=dict(sorted(core.preemptions.items())), digest=h.hexdigest())


def sim_cases(path: str, rates: list[float]) -> list[dict]:
    requests = read_trace(path)
    estimates = _estimates(path, requests)
    latency_json = LatencyModel.load("profiles/opt-13b-h100-roofline.json").to_json()
    setups = {
        "1w": (sim_mod.SimConfig(), None),
        "2w-host": (_HostConfig(kv_tokens=8_000, num_workers=2, num_host_blocks=300), 300),
    }
    out = []
    real_worker = sim_mod.VirtualWorker
    for setup, (config, host) in setups.items():
        sim_mod.VirtualWorker = (functools.partial(real_worker, num_host_blocks=host,
                                                   block_bytes=1 << 20)
                                 if host else real_worker)
        try:
            for policy in ("fcfs", "alise", "oracle"):
                for rate in rates:
                    latency = LatencyModel.from_json(latency_json)
                    label = f"{Path(path).stem} {setup} {policy} {rate:g}"

                    def fn(policy=policy, rate=rate, latency=latency, config=config):
                        res = sim_mod.simulate(rescale(requests, rate), make_policy(policy, latency),
                                               latency, config, estimates=estimates)
                        return (res.records, res.makespan_s, res.num_steps)

                    out.append(_run(label, fn))
                    print(json.dumps(out[-1]), flush=True)
        finally:
            sim_mod.VirtualWorker = real_worker
    return out


def overhead_cases(steps: int) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parent))
    import sched_overhead

    out = []
    for policy in ("fcfs", "alise", "oracle"):
        def fn(policy=policy):
            _, running, queued = sched_overhead.run(policy, num_running=256, num_queued=1000,
                                                    steps=steps, seed=0)
            return (running, queued)

        out.append(_run(f"sched_overhead {policy}", fn))
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trace", action="append", default=[])
    p.add_argument("--rates", action="append", default=[],
                   help="comma-separated rates, one option per --trace")
    p.add_argument("--overhead-steps", type=int, default=150)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    _install_hook()
    results = []
    for i, path in enumerate(args.trace):
        rates = [float(x) for x in args.rates[i].split(",")] if i < len(args.rates) else [5.0, 8.0]
        results += sim_cases(path, rates)
    if args.overhead_steps:
        results += overhead_cases(args.overhead_steps)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
