"""Runs docker-compose.yml's service commands as local processes (no Docker engine needed)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import yaml
from alise.cluster.local import LocalCluster

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_commands() -> dict[str, list[str]]:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {name: list(svc["command"]) for name, svc in spec["services"].items()}


def localize(commands: dict[str, list[str]], data_dir: Path, ports: dict[int, int],
             policy: str = "fcfs") -> dict[str, list[str]]:
    """Compose's commands with service host names and ports mapped onto loopback."""
    out = {}
    for name, argv in commands.items():
        assert argv[0] == "alise", f"{name}: compose must run the alise command, got {argv[0]}"
        args = []
        for arg in argv[1:]:
            arg = arg.replace("${ALISE_POLICY:-fcfs}", policy).replace("/data", str(data_dir))
            for host in ("0.0.0.0", "scheduler", "predictor"):
                if arg.startswith(host + ":"):
                    port = int(arg.split(":")[1])
                    arg = f"127.0.0.1:{ports.setdefault(port, free_port())}"
            args.append(arg)
        out[name] = args
    return out


def start_compose_cluster(tmp: Path, model: str, *, num_workers: int = 1, policy: str = "fcfs",
                          worker_args: tuple[str, ...] = ()) -> tuple[LocalCluster, str]:
    ports: dict[int, int] = {}
    commands = localize(compose_commands(), tmp / "data", ports, policy)
    if os.environ.get("ALISE_TEST_NO_PREDICTOR"):
        commands.pop("predictor")
        sched = commands["scheduler"]
        i = sched.index("--predictor")
        del sched[i:i + 2]
    worker = commands.pop("worker")
    for i in range(num_workers):
        cmd = list(worker)
        health_index = cmd.index("--health-address") + 1
        cmd[health_index] = f"127.0.0.1:{free_port()}"
        commands[f"worker-{i}"] = cmd + ["--worker-id", f"worker-{i}", *worker_args]
    cluster = LocalCluster(commands, log_dir=str(tmp / "logs"), env={"ALISE_MODEL": model})
    address = f"127.0.0.1:{ports[50051]}"
    return cluster, address
