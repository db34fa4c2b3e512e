"""A random workload driven through the scheduler core, recorded as one digest per plan.

Every decision the core makes shows in a plan (admits with their cached prefixes, pauses with
their KV actions, resumes, chunks, whether a step runs), so two cores that make the same plans
for the same workload decided alike. The workload covers what moves the core's state: arrivals
(some sharing prompt prefixes, some without an estimate), finishes at an end-of-sequence token
or ``max_tokens``, new estimates, cancels, tight memory (preemptions, swaps, quantization,
drops), two plans in flight per worker, census steps, two workers (routing) one of which is lost
and replaced, and a latency model replaced mid-run. The virtual workers are the worker's own
engine over a latency model (``alise.tools.sim.virtual_worker``).

Where a virtual worker's step lasts exactly what the scheduler's model predicts, the model's
online correction never leaves 1.0, and every decision that reads it (alise's keys and switch
cost, the expected waits the memory planner weighs, routing) runs as if it were not there. A
scenario with a ``drift`` therefore times its steps on a device model of its own, whose
correction follows a triangle from ``drift[0]`` up to ``drift[1]`` and back over the run, times
a seeded jitter of +-``JITTER``; the scheduler's model observes every report as the service does
(``SchedulerEngine._observe_latency``), so its correction moves on every step.

``python tests/unit/plan_trace.py`` rewrites ``tests/unit/data/plan_trace.json`` from the
current code; ``test_plan_trace.py`` compares the current code's plans with it.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

from alise.core.blocks import WorkerCapacity
from alise.core.build import make_core
from alise.core.commands import Admit
from alise.core.config import SchedulingConfig
from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.sampling import SamplingParams
from alise.core.scheduler import SchedulerCore
from alise.tools.sim.virtual_worker import virtual_worker
from alise.worker.engine import WorkerEngine

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("data") / "plan_trace.json"
POLICIES = ("fcfs", "alise", "oracle")
SCENARIOS = {
    # One worker with prefix caching, host memory and little device memory.
    "one": {"workers": 1, "blocks": 96, "host": 160, "seqs": 12, "tokens": 96, "ticks": 400},
    # Two workers (routing); the second is lost at tick 120 and another joins.
    "two": {"workers": 2, "blocks": 72, "host": 0, "seqs": 8, "tokens": 64, "ticks": 300},
    # Two workers with host memory, on devices slower or faster than the model says; the blocks
    # are OPT-13B's (16 tokens of 800 kB), so that swaps take as long as a step or two.
    "drift": {"workers": 2, "blocks": 80, "host": 128, "seqs": 10, "tokens": 80, "ticks": 400,
              "drift": (0.85, 1.3), "block_bytes": 16 * 800_000},
}
#: A drifting device's per-step jitter: its step lasts up to this fraction more or less.
JITTER = 0.06
PLANS_AHEAD = 2
BLOCK_SIZE = 16
MAX_MODEL_LEN = 512


class Driver:
    """Feeds the workload to ``core`` tick by tick and digests each plan it makes."""

    def __init__(self, policy: str, spec: dict, seed: int) -> None:
        self.rng = random.Random(seed)
        self.spec = spec
        self.latency = LatencyModel.load(str(ROOT / "profiles/opt-13b-h100-roofline.json"))
        # The devices' own timing: the scheduler's model itself unless the scenario drifts.
        self.device = self.latency
        if "drift" in spec:
            self.device = LatencyModel.load(str(ROOT / "profiles/opt-13b-h100-roofline.json"))
            self.device_rng = random.Random(f"device{seed}")  # the workload's draws stay as they are
        self.core: SchedulerCore = make_core(SchedulingConfig(policy=policy), self.latency)
        self.engines: dict[str, WorkerEngine] = {}
        self.targets: dict[str, int] = {}
        self.queues: dict[str, list] = {}
        self.digests: list[str] = []
        self.now_s = 0.0
        self.count = 0
        self.last: tuple[list[int], int, int, LengthEstimate | None] | None = None
        self.prefixes = [[self.rng.randrange(1, 30000) for _ in range(n)] for n in (40, 70, 100)]
        for w in range(spec["workers"]):
            self.add_worker(f"w{w}", prefix_caching=w == 0)

    def add_worker(self, worker_id: str, *, prefix_caching: bool) -> None:
        s = self.spec
        self.core.add_worker(WorkerCapacity(worker_id, BLOCK_SIZE, s["blocks"], s["host"], MAX_MODEL_LEN,
                                            s["seqs"], s["tokens"], block_bytes=s.get("block_bytes", 1 << 20),
                                            prefix_caching=prefix_caching))
        self.engines[worker_id] = virtual_worker(
            num_device_blocks=s["blocks"], block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
            latency=self.device, num_host_blocks=s["host"], target_lengths=self.targets,
            block_bytes=s.get("block_bytes", 1 << 20), prefix_caching=prefix_caching)
        self.queues[worker_id] = []

    def arrive(self) -> None:
        rng = self.rng
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            job_id = f"j{self.count}"
            self.count += 1
            if self.last is None or rng.random() < 0.7:
                tail = [rng.randrange(1, 30000) for _ in range(rng.randint(4, 160))]
                prompt = (rng.choice(self.prefixes) if rng.random() < 0.4 else []) + tail
                true_len = rng.randint(1, 320)
                estimate = None
                if rng.random() < 0.8:
                    mean = max(1.0, true_len * rng.lognormvariate(0, 0.6))
                    estimate = LengthEstimate(mean, mean, mean * rng.uniform(1.0, 2.5), "test")
                self.last = (prompt, rng.randint(8, 300), true_len, estimate)
            # Otherwise a twin of the last arrival: equal keys, so ties decide between them.
            prompt, max_tokens, true_len, estimate = self.last
            self.targets[job_id] = true_len
            self.core.submit(Job(job_id, list(prompt), SamplingParams(max_tokens=max_tokens), arrival_s=self.now_s,
                                 estimate=estimate, oracle_output_tokens=true_len if rng.random() < 0.7 else None))

    def perturb(self) -> None:
        rng, core = self.rng, self.core
        ids = sorted(core.jobs)
        if ids and rng.random() < 0.3:
            mean = rng.uniform(1, 400)
            core.update_estimate(rng.choice(ids), LengthEstimate(mean, mean, mean * 1.5, "test"))
        if ids and rng.random() < 0.06:
            core.cancel(rng.choice(ids), self.now_s)

    def plan(self, worker_id: str, tick: int) -> None:
        core, engine = self.core, self.engines[worker_id]
        aborts, through = core.take_aborts(worker_id)
        if aborts:
            engine.abort(aborts, through)
        while core.num_in_flight(worker_id) < PLANS_AHEAD:
            plan = core.schedule(worker_id, self.now_s, census=tick % 23 == 0)
            if plan.is_empty:
                break
            # An admit's sampling as its max_tokens, the one field these jobs vary: a field added
            # to SamplingParams (with a default) changes its repr, not the decision.
            commands = [replace(c, sampling=c.sampling.max_tokens) if isinstance(c, Admit) else c
                        for c in plan.commands]
            record = (worker_id, plan.step_id, commands, sorted(plan.chunks.items()), plan.run_step)
            self.digests.append(hashlib.sha1(repr(record).encode()).hexdigest()[:10])
            self.queues[worker_id].append(plan)

    def run_one(self, worker_id: str, tick: int) -> float:
        """Runs the worker's oldest plan and applies its report; the step's seconds."""
        if not self.queues[worker_id]:
            return 0.0
        drift = self.spec.get("drift")
        if drift is not None:
            low, high = drift
            rise = 1 - abs(2 * tick / self.spec["ticks"] - 1)  # 0 -> 1 -> 0 over the run
            self.device.correction = (low + (high - low) * rise) * self.device_rng.uniform(1 - JITTER, 1 + JITTER)
        report = self.engines[worker_id].run(self.queues[worker_id].pop(0))
        self.core.apply_report(worker_id, report, self.now_s + report.step_duration_s)
        if drift is not None and report.step_duration_s > 0 and report.num_seqs:
            self.latency.observe_step(report.step_duration_s, report.num_seqs, report.num_context_tokens,
                                      [n for _, n in report.chunks], [s for s, _ in report.chunks])
        return report.step_duration_s

    def tick(self, tick: int) -> None:
        self.arrive()
        self.perturb()
        if tick == 120 and "w1" in self.engines:
            self.core.remove_worker("w1", self.now_s)
            del self.engines["w1"], self.queues["w1"]
            self.add_worker("w2", prefix_caching=False)
        if tick == 90:
            self.core.latency_changed()
        for worker_id in sorted(self.engines):
            self.plan(worker_id, tick)
        self.now_s += max([self.run_one(w, tick) for w in sorted(self.engines)] + [0.001])

    def run(self) -> dict:
        for tick in range(self.spec["ticks"]):
            self.tick(tick)
        core = self.core
        return {"plans": self.digests, "finished": core.num_finished, "cancelled": core.num_cancelled,
                "preemptions": dict(sorted(core.preemptions.items())),
                "kv_moves": dict(sorted(core.kv_moves.items())),
                "prefill": [core.prefill.num_admitted_tokens, core.prefill.num_cached_tokens,
                            core.prefill.num_computed_tokens]}


def record_all() -> dict:
    return {f"{name}/{policy}": Driver(policy, spec, seed=i).run()
            for i, (name, spec) in enumerate(SCENARIOS.items()) for policy in POLICIES}


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(record_all(), separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
