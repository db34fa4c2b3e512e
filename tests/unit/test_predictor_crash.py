"""kill -9 at random moments while the predictor snapshots: the last complete snapshot loads."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from alise.predictor.snapshot import load_snapshot

WRITER = r"""
import sys, numpy as np
from alise.predictor.history import History
from alise.predictor.index import VectorIndex
from alise.predictor.snapshot import save_snapshot
rng = np.random.default_rng(0)
history = History(VectorIndex(64))
vectors = rng.standard_normal((4000, 64)).astype(np.float32)
rows = history.add_prompts([f"prompt {i}" for i in range(4000)], vectors, [5] * 4000)
while True:
    history.add_observations(rows[:500], ["m"] * 500, list(range(500)))
    save_snapshot(history, sys.argv[1], "enc")
    print(history.num_observations, flush=True)
"""


def test_kill_during_snapshot_leaves_the_last_complete_one(tmp_path):
    rng = random.Random(1)
    for trial in range(4):
        index_dir = tmp_path / f"index-{trial}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(index_dir)], stdout=subprocess.PIPE,
                                text=True)
        saved = [int(proc.stdout.readline())]      # at least one snapshot completed
        time.sleep(rng.uniform(0.0, 0.4))           # then die somewhere in a later one
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        saved += [int(line) for line in proc.stdout.read().split()]
        loaded = load_snapshot(index_dir, "enc", 64)
        assert loaded is not None
        history = loaded.history
        # The last snapshot the writer reported, or the one it finished but died before reporting.
        assert history.num_observations in (saved[-1], saved[-1] + 500), (trial, history.num_observations, saved)
        rows, _, tokens = history.observations()
        assert np.array_equal(tokens[:500], np.arange(500))
