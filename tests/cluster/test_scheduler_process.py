"""`alise scheduler` as a process never imports torch, nor the worker's model code or the
tooling: it reads the model (a preset or a directory) through alise.modelinfo alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.cluster

#: Packages the scheduler process must not import (a prefix of each module's name).
FORBIDDEN = ("torch", "alise.worker.model", "alise.worker.kernels", "alise.tools")


def modules_of_a_serving_scheduler(model: str, tmp_path) -> list[str]:
    """Starts `alise scheduler --model MODEL` under ``python -X importtime``, waits until it
    listens, stops it with SIGTERM and returns every module it imported."""
    log = tmp_path / "scheduler.log"
    command = [sys.executable, "-X", "importtime", "-m", "alise.cli.main", "scheduler", "--model", model,
               "--address", "127.0.0.1:0", "--worker-address", "127.0.0.1:0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "ALISE_LOG_FORMAT": "text"})
        try:
            deadline = time.monotonic() + 120
            while b"listening for clients" not in log.read_bytes():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    lines = log.read_text().splitlines()
    return [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")][1:]


def forbidden(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


@pytest.mark.parametrize("model", ["tiny-llama", "directory"])
def test_the_scheduler_process_imports_no_torch(model, tmp_path, tiny_llama_dir):
    modules = modules_of_a_serving_scheduler(str(tiny_llama_dir) if model == "directory" else model, tmp_path)
    assert "alise.modelinfo.tokenizer" in modules and "alise.scheduler.service" in modules
    assert forbidden(modules) == []


def test_the_check_sees_torch_where_it_is_imported():
    assert forbidden(["alise.cli", "torch", "torch.nn", "alise.worker.model.loader", "alise.workers"]) == [
        "alise.worker.model.loader", "torch", "torch.nn"]
