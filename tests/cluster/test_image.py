"""The images' command as a container runs it: every listener on the container's interfaces,
the ports it exposes exactly those, and the door reachable from another address.

No Docker engine here: the CPU image's CMD runs as a process in a network namespace of its own
(as a container's), with a veth pair for its interface, the way the cluster tests run
compose's commands as local processes."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from compose_cluster import ROOT
from test_up import is_running, wait_until

from alise.cli.main import build_parser
from alise.cluster.config import listen_addresses, service_commands
from alise.cluster.main import config_from_args

pytestmark = pytest.mark.cluster

#: The container's address and a second one on its network (the other end of the veth pair).
CONTAINER_IP, PEER_IP = "10.213.0.2", "10.213.0.3"


def dockerfile(name: str) -> tuple[list[str], set[int]]:
    """The CMD (exec form) and the EXPOSEd ports of a Dockerfile."""
    cmd, exposed = None, set()
    for line in (ROOT / name).read_text().splitlines():
        if line.startswith("CMD "):
            cmd = json.loads(line[4:])
        elif line.startswith("EXPOSE "):
            exposed |= {int(p) for p in line.split()[1:]}
    return cmd, exposed


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_the_image_listens_on_every_interface_and_exposes_exactly_its_ports(name):
    cmd, exposed = dockerfile(name)
    assert cmd[:2] == ["alise", "up"]
    commands = service_commands(config_from_args(build_parser().parse_args(cmd[1:])))
    listeners = [address for argv in commands.values() for address in listen_addresses(argv).values()]
    assert {address.rsplit(":", 1)[0] for address in listeners} == {"0.0.0.0"}
    assert {int(address.rsplit(":", 1)[1]) for address in listeners} == exposed
    assert any(kind == "metrics" for argv in commands.values() for kind in listen_addresses(argv))


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of each socket process ``pid`` listens on, read from its own network
    namespace's tables (/proc/PID/net)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:
                address, port = fields[1].split(":")
                found.add((socket.inet_ntop(socket.AF_INET if table == "tcp" else socket.AF_INET6,
                                            bytes.fromhex(address)[::-1] if table == "tcp" else
                                            b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))),
                           int(port, 16)))
    return found


def _in_namespace(setup: str, argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["unshare", "--net", "sh", "-c", f"{setup} && exec {shlex.join(argv)}"], **kwargs)


def test_the_cpu_images_command_serves_from_the_containers_address(tmp_path):
    veth = (f"ip link set lo up && ip link add v0 type veth peer name v1 && ip addr add {CONTAINER_IP}/24 dev v0 "
            f"&& ip addr add {PEER_IP}/24 dev v1 && ip link set v0 up && ip link set v1 up")
    probe = subprocess.run(["unshare", "--net", "sh", "-c", veth], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace with a veth pair here: {probe.stderr.strip()}")
    cmd, exposed = dockerfile("Dockerfile")
    state = tmp_path / "state"
    with open(tmp_path / "up.stderr", "wb") as err:
        up = _in_namespace(veth, [sys.executable, "-m", "alise.cli.main", *cmd[1:], "--state-dir", str(state)],
                           stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    stderr = lambda: (tmp_path / "up.stderr").read_text(errors="replace")  # noqa: E731
    try:
        wait_until(lambda: "cluster ready" in stderr() or up.poll() is not None, 300, "the image's cluster ready")
        assert up.poll() is None, stderr()
        pids = [s["pid"] for s in json.loads((state / "cluster.json").read_text())["services"].values()]
        assert pids and all(is_running(pid) for pid in pids)
        listening = set().union(*(_listening(pid) for pid in pids))
        # Every interface: 0.0.0.0, or :: where grpc opens one dual-stack socket for it.
        assert {address for address, _ in listening} <= {"0.0.0.0", "::"}, listening
        assert {port for _, port in listening} == exposed
        # A client on the container's network, from the other end of the veth pair.
        client = ("import http.client, json; "
                  f"c = http.client.HTTPConnection('{CONTAINER_IP}', 8000, timeout=60, "
                  f"source_address=('{PEER_IP}', 0)); "
                  "c.request('POST', '/v1/completions', json.dumps({'prompt': 'hi', 'max_tokens': 3, "
                  "'ignore_eos': True}), {'Content-Type': 'application/json'}); r = c.getresponse(); "
                  "print(r.status, json.loads(r.read())['usage']['completion_tokens'])")
        out = subprocess.run(["nsenter", f"--net=/proc/{up.pid}/ns/net", sys.executable, "-c", client],
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == ["200", "3"], out.stderr
        grpc = subprocess.run(["nsenter", f"--net=/proc/{up.pid}/ns/net", sys.executable, "-m", "alise.cli.main",
                               "generate", "hi", "--address", f"{CONTAINER_IP}:50051", "--max-tokens", "2",
                               "--ignore-eos"], capture_output=True, text=True, timeout=120)
        assert "[2 tokens, finish=length" in grpc.stderr, grpc.stderr
    finally:
        up.terminate()
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0, stderr()[-3000:]
