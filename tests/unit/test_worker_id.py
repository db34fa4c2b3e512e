"""A worker's default id: its host and device, the same after a restart (so its metrics and
status line continue), different for two GPUs of one host."""

from __future__ import annotations

import socket

from alise.worker.config import WorkerConfig


def test_the_default_id_is_host_and_device_and_survives_a_restart(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    host = socket.gethostname()
    assert WorkerConfig(device="cpu").resolved_worker_id == f"{host}-cpu"
    assert WorkerConfig(device="cuda").resolved_worker_id == f"{host}-cuda0"
    assert WorkerConfig(device="cuda:1").resolved_worker_id == f"{host}-cuda1"
    # A restart is a new process with the same settings: the same id (no pid in it).
    assert WorkerConfig(device="cuda:1").resolved_worker_id == WorkerConfig(device="cuda:1").resolved_worker_id
    assert WorkerConfig(device="cpu", worker_id="mine").resolved_worker_id == "mine"


def test_a_cuda_index_is_the_physical_gpu(monkeypatch):
    host = socket.gethostname()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert WorkerConfig(device="cuda").resolved_worker_id == f"{host}-cuda3"
    assert WorkerConfig(device="cuda:1").resolved_worker_id == f"{host}-cuda5"
