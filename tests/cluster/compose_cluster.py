"""docker-compose.yml and k8s/ read as data: their services' commands, normalized so they can
be compared with each other and with `alise up`'s, and run as local processes (no Docker
engine needed)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import yaml

from alise.cluster.local import LocalCluster

ROOT = Path(__file__).resolve().parents[2]

#: ${NAME:-default} in compose, $(NAME) in Kubernetes: both become ${NAME} when compared.
_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
_K8S_VAR = re.compile(r"\$\((\w+)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_spec() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_commands() -> dict[str, list[str]]:
    return {name: list(svc["command"]) for name, svc in compose_spec()["services"].items()}


def compose_defaults() -> dict[str, str]:
    """The default of each ${NAME:-default} that compose's commands use."""
    found = {}
    for argv in compose_commands().values():
        for arg in argv:
            for name, default in _COMPOSE_VAR.findall(arg):
                found[name] = default
    return found


def symbolic(arg: str) -> str:
    """One spelling for a variable in either file: ${NAME}."""
    return _K8S_VAR.sub(r"${\1}", _COMPOSE_VAR.sub(r"${\1}", arg))


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def localize(commands: dict[str, list[str]], data_dir: Path, ports: dict[int, int],
             variables: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Compose's commands with variables at their defaults (or ``variables``), and service
    host names and ports mapped onto loopback."""
    values = {**compose_defaults(), **(variables or {})}
    out = {}
    for name, argv in commands.items():
        assert argv[0] == "alise", f"{name}: compose must run the alise command, got {argv[0]}"
        args = []
        for arg in argv[1:]:
            arg = _COMPOSE_VAR.sub(lambda m: values[m.group(1)], arg).replace("/data", str(data_dir))
            for host in ("0.0.0.0", "scheduler", "predictor"):
                if arg.startswith(host + ":"):
                    port = int(arg.split(":")[1])
                    arg = f"127.0.0.1:{ports.setdefault(port, free_port())}"
            args.append(arg)
        out[name] = args
    return out


def start_compose_cluster(tmp: Path, model: str, *, num_workers: int = 1, policy: str | None = None,
                          worker_args: tuple[str, ...] = ()) -> tuple[LocalCluster, str]:
    ports: dict[int, int] = {}
    variables = {"ALISE_POLICY": policy} if policy else {}
    commands = localize(compose_commands(), tmp / "data", ports, variables)
    if os.environ.get("ALISE_TEST_NO_PREDICTOR"):
        commands.pop("predictor")
        sched = commands["scheduler"]
        i = sched.index("--predictor")
        del sched[i:i + 2]
    worker = commands.pop("worker")
    for i in range(num_workers):
        cmd = list(worker)
        # Compose's workers are containers of their own; here they share the host's ports.
        for flag in ("--health-address", "--metrics-address"):
            cmd[cmd.index(flag) + 1] = f"127.0.0.1:{free_port()}"
        commands[f"worker-{i}"] = cmd + ["--worker-id", f"worker-{i}", *worker_args]
    cluster = LocalCluster(commands, log_dir=str(tmp / "logs"), env={"ALISE_MODEL": model})
    address = f"127.0.0.1:{ports[50051]}"
    return cluster, address
