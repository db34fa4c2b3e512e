"""Refits in a row: whether each is served, its validation, its time and the process's memory.

    .venv/bin/python bench/predictor_refits.py [--refits 12] [--add 200]

A predictor runtime (no gRPC) bootstrapped from the 12 AlpacaEval files; before each refit,
``--add`` observations already in the history are sent again (sound answers, as a steady
stream of repeat traffic gives), so every refit should be served. Prints, per refit: served,
seconds, held-out observations, the serving fit's and the trial fit's mean absolute log error
and the standard error of their difference, then the resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import time

import numpy as np

from alise.tools.lab.local_cluster import rss_mib

DATA = sorted(glob.glob("/work/shared/data/alpaca_eval/*.jsonl.gz"))


async def run(num_refits: int, num_add: int, seed: int) -> None:
    from alise.predictor.config import PredictorConfig
    from alise.predictor.runtime import PredictorRuntime

    runtime = await PredictorRuntime.create(PredictorConfig(bootstrap=tuple(DATA), model="gpt4"))
    history = runtime.history
    rows, models, tokens = (a.copy() for a in history.observations())
    rng = np.random.default_rng(seed)
    print(f"{'refit':>5} {'served':>7} {'s':>6} {'held out':>9} {'serving':>8} {'trial':>8} {'se':>7} {'RSS MiB':>8}")
    for i in range(num_refits):
        pick = rng.integers(0, len(rows), num_add)
        history.add_observations(rows[pick], [history.models[m] for m in models[pick]], tokens[pick])
        runtime.estimator.sync()
        started = time.perf_counter()
        served = await runtime.refit()
        seconds = time.perf_counter() - started
        v = runtime.last_validation
        judged = (f"{v.num_held_out:9d} {v.serving_error:8.4f} {v.candidate_error:8.4f} {v.difference_se:7.4f}"
                  if v is not None else f"{'-':>9} {'-':>8} {'-':>8} {'-':>7}")
        print(f"{i + 1:5d} {str(served):>7} {seconds:6.1f} {judged} {rss_mib(os.getpid()):8.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refits", type=int, default=12)
    p.add_argument("--add", type=int, default=200, help="observations re-sent before each refit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    asyncio.run(run(args.refits, args.add, args.seed))


if __name__ == "__main__":
    main()
