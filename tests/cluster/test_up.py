"""`alise up` itself, run as a process the way a person runs it: it supervises its services,
refuses taken ports, and takes its children with it however it ends."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from alise.client import AsyncClient, Client

pytestmark = pytest.mark.cluster

#: Small caches and no waiting on the CPU: these clusters only have to serve a few streams.
SMALL_WORKERS = ["--num-device-blocks", "256", "--block-size", "4"]


def is_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.2) -> float:
    """Seconds until ``condition()`` held; fails the test after the (generous) bound."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(interval_s)
    return time.monotonic() - start


class Up:
    """One `alise up` process with its own state directory; every port is any free one."""

    def __init__(self, tmp: Path, model: str, *args: str, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir or tmp / "state"
        self.stderr_path = tmp / "up.stderr"
        command = [sys.executable, "-m", "alise.cli.main", "up", "--model", model, "--address", "127.0.0.1:0",
                   "--worker-address", "127.0.0.1:0", "--predictor-address", "127.0.0.1:0", "--worker-health-port", "0",
                   "--metrics-port", "0", "--http-address", "127.0.0.1:0", "--http-health-address", "127.0.0.1:0",
                   "--state-dir", str(self.state_dir), *args]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300) -> None:
        wait_until(lambda: "cluster ready" in self.stderr or self.proc.poll() is not None, timeout_s,
                   "alise up ready")
        assert self.proc.poll() is None, self.stderr

    def state(self) -> dict:
        return json.loads((self.state_dir / "cluster.json").read_text())

    @property
    def address(self) -> str:
        return self.state()["address"]

    def service_pids(self) -> list[int]:
        return [s["pid"] for s in self.state()["services"].values() if s["pid"]]

    def wait_exit(self, timeout_s: float = 120) -> int:
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def hold_port(port: int) -> socket.socket:
    """Listens on ``port`` (as another program would), once whatever held it is gone. With
    SO_REUSEADDR, as servers bind: the killed holder's connections in TIME_WAIT (the
    supervisor's health probes) would keep a plain bind out past the restart that takes the
    port back."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def bound() -> bool:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
    wait_until(bound, 30, f"port {port} free")
    sock.listen()
    return sock


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_llama_dir):
    cluster = Up(tmp_path_factory.mktemp("up"), str(tiny_llama_dir), "--workers", "2", "--crash-loop-after", "2",
                 "--log-max-mb", "0.0005", "--log-backups", "2", "--served-model-name", "tiny-chat", *SMALL_WORKERS)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.close()
        print(cluster.stderr[-3000:])


def test_status_lists_every_service_with_its_ports(up):
    out = subprocess.run([sys.executable, "-m", "alise.cli.main", "status", "--json", "--address", up.address,
                          "--state-dir", str(up.state_dir)], capture_output=True, text=True, check=True)
    status = json.loads(out.stdout)
    assert status["policy"] == "alise"
    assert sorted(w["worker_id"] for w in status["workers"]) == ["worker-0", "worker-1"]
    assert all(isinstance(w["num_steps"], int) and isinstance(w["num_device_blocks"], int)
               for w in status["workers"])
    services = status["local_cluster"]["services"]
    assert sorted(services) == ["http", "predictor", "scheduler", "worker-0", "worker-1"]
    assert services["scheduler"]["listen"]["grpc"] == up.address
    assert {kind for s in services.values() for kind in s["listen"]} == {"grpc", "workers", "health", "metrics"}
    assert all(s["state"] == "serving" and is_running(s["pid"]) for s in services.values())
    text = subprocess.run([sys.executable, "-m", "alise.cli.main", "status", "--address", up.address,
                           "--state-dir", str(up.state_dir)], capture_output=True, text=True, check=True).stdout
    door = next(line for line in text.splitlines() if line.split()[:1] == ["http"])
    assert f"http {services['http']['listen']['grpc']}" in door and " grpc " not in door, door
    assert "served model name: tiny-chat" in text.splitlines()
    import httpx

    models = httpx.get(f"http://{services['http']['listen']['grpc']}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny-chat"]


def _health_addresses(up) -> dict[str, str]:
    return {name: s["listen"].get("health") or s["listen"]["grpc"] for name, s in up.state()["services"].items()}


def test_health_watch_list_and_reflection_v1_on_every_service(up):
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    served = {}
    for name, address in _health_addresses(up).items():
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            first = next(watch)
            watch.cancel()
            listed = health.List(health_pb2.HealthListRequest(), timeout=10)
            v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                       request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                       response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            [reply] = list(v1(iter([request]), timeout=10))
        assert first.status == health_pb2.HealthCheckResponse.SERVING, name
        assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING, name
        served[name] = {s.name for s in reply.list_services_response.service}
    plumbing = {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"}
    assert all(plumbing <= names for names in served.values()), served
    assert "alise.v1.SchedulerService" in served["scheduler"]
    assert "alise.v1.PredictorService" in served["predictor"]


def test_workers_need_the_clusters_own_secret(up):
    """alise up gives its services a secret made for the cluster: a process without it that
    dials the worker listener is refused, while the cluster's workers serve."""
    state = up.state()
    workers_address = state["services"]["scheduler"]["listen"]["workers"]
    rogue = Path(__file__).resolve().parents[2] / "bench" / "rogue_worker.py"
    out = subprocess.run([sys.executable, str(rogue), workers_address, "--secret", "guessed"],
                         capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"code": "UNAUTHENTICATED", "prompts": []}
    with Client(up.address) as client:
        assert len(client.complete("still served", max_tokens=2, ignore_eos=True).token_ids) == 2
    assert "ALISE_INTERNAL_SECRET" not in (up.state_dir / "cluster.json").read_text()


def test_generate_prints_a_one_token_usage_line(up):
    out = subprocess.run([sys.executable, "-m", "alise.cli.main", "generate", "hi", "--address", up.address,
                          "--max-tokens", "1", "--ignore-eos"], capture_output=True, text=True, check=True)
    assert "[1 token, finish=length" in out.stderr


@pytest.mark.parametrize("service, kind, says", [
    ("predictor", "grpc", "is not an ALISE scheduler: it is the ALISE predictor (alise.v1.PredictorService)"),
    ("worker-0", "health", "is not an ALISE scheduler: it is a server of health checks only"),
    ("scheduler", "workers", "is not an ALISE scheduler: it is the ALISE scheduler's worker listener"),
    ("scheduler", "metrics", "answers HTTP/1, not gRPC: it is not an ALISE scheduler"),
])
def test_the_wrong_address_says_what_answers_there(up, service, kind, says):
    address = up.state()["services"][service]["listen"][kind]
    out = subprocess.run([sys.executable, "-m", "alise.cli.main", "generate", "hi", "--address", address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"alise: {'UNIMPLEMENTED' if kind != 'metrics' else 'UNAVAILABLE'}: {address} {says}" in out.stderr


def test_the_readme_sdk_example_runs_as_pasted(up, tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("## The SDK", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    default = 'address = "127.0.0.1:50051"'
    assert default in example
    script = tmp_path / "example.py"
    script.write_text(example.replace(default, f'address = "{up.address}"'))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert " tokens\n" in out.stdout


def test_worker_killed_mid_stream_the_stream_completes_and_the_worker_returns(up):
    before = up.state()["services"]["worker-1"]

    async def stream() -> list:
        chunks = []
        async with AsyncClient(up.address) as client:
            async for chunk in client.generate("keep going", max_tokens=80, ignore_eos=True, temperature=0):
                chunks.append(chunk)
                if len(chunks) == 3:
                    os.kill(before["pid"], signal.SIGKILL)
        return chunks

    chunks = asyncio.run(asyncio.wait_for(stream(), 240))
    assert sum(len(c.token_ids) for c in chunks) == 80
    assert [c.index for c in chunks] == [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]

    def back() -> bool:
        s = up.state()["services"]["worker-1"]
        return s["state"] == "serving" and s["restarts"] == 1
    seconds = wait_until(back, 180, "worker-1 restarted and serving")
    print(f"worker-1 serving again {seconds:.1f} s after its stream finished")
    after = up.state()["services"]["worker-1"]
    assert after["pid"] != before["pid"] and after["last_exit_code"] == -signal.SIGKILL
    with Client(up.address) as client:
        wait_until(lambda: len(client.status().workers) == 2, 60, "two workers attached")
    assert up.proc.poll() is None
    assert "worker-1 exited with code -9" in up.stderr


def test_predictor_killed_is_restarted(up):
    before = up.state()["services"]["predictor"]
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(lambda: up.state()["services"]["predictor"]["restarts"] == 1
               and up.state()["services"]["predictor"]["state"] == "serving", 180, "predictor back")
    with Client(up.address) as client:
        assert len(client.complete("after the predictor", max_tokens=4, ignore_eos=True).token_ids) == 4
    assert up.proc.poll() is None


def test_a_hung_service_is_killed_and_restarted(up):
    """SIGSTOP of the predictor and the HTTP door: each stops answering health checks while
    its process lives; within --hang-timeout (3 s) and a probe it is killed and restarted."""
    services = up.state()["services"]
    stopped = {name: services[name]["pid"] for name in ("predictor", "http")}
    start = time.monotonic()
    for pid in stopped.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        def killed() -> bool:
            return all(not is_running(pid) for pid in stopped.values())
        seconds = wait_until(killed, 30, "the stopped services killed", interval_s=0.1)
    finally:
        for pid in stopped.values():
            if is_running(pid):
                os.kill(pid, signal.SIGCONT)
    print(f"stopped services killed {seconds:.1f} s after SIGSTOP")
    assert seconds <= 3.0 + 1.0 + 2.0  # --hang-timeout, a probe interval, this busy machine's slack
    for name in stopped:
        assert re.search(rf"{name} \(pid \d+\) is hung: no answer on its health listener", up.stderr)

    def back() -> bool:
        now = up.state()["services"]
        return all(now[n]["state"] == "serving" and now[n]["pid"] not in stopped.values() for n in stopped)
    wait_until(back, 180, "predictor and HTTP door serving again")
    last_exit = up.state()["services"]["predictor"]["last_exit"]
    assert last_exit.startswith("killed: hung: no answer on its health listener"), last_exit
    assert time.monotonic() - start < 180 and up.proc.poll() is None


def test_logs_rotate_by_size(up):
    """--log-max-mb 0.0005 (524 bytes), --log-backups 2: the services' output goes through the
    rotation: no file past that size by more than one write, at most two kept."""
    logs = up.state_dir / "logs"
    wait_until(lambda: (logs / "predictor.log.1").exists(), 60, "the predictor's log rotated")
    for name in up.state()["services"]:
        files = sorted(p.name for p in logs.glob(f"{name}.log*"))
        assert f"{name}.log.3" not in files, files
        assert all((logs / f).stat().st_size <= 524 + 65536 for f in files)
    assert "rotated at 524 bytes, 2 kept" in up.stderr


def test_a_crash_loop_keeps_the_cluster_up(up):
    """worker-0 is killed, then its health port taken: each restart dies at once (a one-line
    refusal of the port). After two failures in a row (--crash-loop-after 2) it shows as
    crash-looping with its restarts and last exit, the rest serves, and once the port is free
    it serves again."""
    worker = up.state()["services"]["worker-0"]
    os.kill(worker["pid"], signal.SIGKILL)
    sock = hold_port(int(worker["listen"]["health"].rsplit(":", 1)[1]))
    try:
        wait_until(lambda: up.state()["services"]["worker-0"]["state"] == "crash-looping", 120, "crash-looping")
        state = up.state()["services"]["worker-0"]
        assert state["restarts"] >= 1 and state["last_exit"] == "exit code 1", state
        text = subprocess.run([sys.executable, "-m", "alise.cli.main", "status", "--address", up.address,
                               "--state-dir", str(up.state_dir)], capture_output=True, text=True, check=True).stdout
        line = next(line for line in text.splitlines() if line.split()[:1] == ["worker-0"])
        assert "crash-looping" in line and "last exit: exit code 1" in line, line
        with Client(up.address) as client:
            assert len(client.complete("worker-1 still serves", max_tokens=3, ignore_eos=True).token_ids) == 3
        assert up.proc.poll() is None
        assert "worker-0 is crash-looping: it died 2 times in a row" in up.stderr
        assert "alise worker: port" in (up.state_dir / "logs" / "worker-0.log").read_text() + "".join(
            p.read_text() for p in (up.state_dir / "logs").glob("worker-0.log.*"))
    finally:
        sock.close()
    wait_until(lambda: up.state()["services"]["worker-0"]["state"] == "serving", 180, "worker-0 back")


def _light_cluster(tmp: Path, model: str) -> Up:
    cluster = Up(tmp, model, "--no-predictor", "--workers", "1", *SMALL_WORKERS)
    cluster.wait_ready()
    return cluster


def test_the_scheduler_dying_is_restarted_and_a_stream_carries_on(tmp_path, tiny_llama_dir):
    """kill -9 of the scheduler under `alise up`: it is restarted, the worker keeps its job for the
    new one, and the SDK resumes the stream: every token once, `alise up` still running."""
    cluster = _light_cluster(tmp_path, str(tiny_llama_dir))
    try:
        state = cluster.state()["services"]
        worker_pid = state["worker-0"]["pid"]
        with Client(cluster.address) as client:
            chunks = []
            for chunk in client.generate("outlive the scheduler", max_tokens=120, ignore_eos=True):
                chunks.append(chunk)
                if len(chunks) == 5:
                    os.kill(state["scheduler"]["pid"], signal.SIGKILL)
        assert sum(len(c.token_ids) for c in chunks) == 120
        assert [c.index for c in chunks] == [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]
        assert cluster.proc.poll() is None and is_running(worker_pid)
        assert re.search(r"scheduler exited with code -9 after [\d.]+ s \(signal 9\); restarting it", cluster.stderr)
        assert "scheduler is serving again (restart 1)" in cluster.stderr
    finally:
        cluster.close()


def test_sigkill_of_alise_up_leaves_no_service_running(tmp_path, tiny_llama_dir):
    cluster = _light_cluster(tmp_path, str(tiny_llama_dir))
    try:
        pids = cluster.service_pids()
        assert len(pids) == 3 and all(is_running(p) for p in pids)  # scheduler, worker, HTTP door
        cluster.proc.kill()
        cluster.proc.wait()
        seconds = wait_until(lambda: not any(is_running(p) for p in pids), 60, "orphans gone")
        print(f"services gone {seconds:.1f} s after SIGKILL of alise up")
    finally:
        for pid in pids:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_drains_and_exits_0(tmp_path, tiny_llama_dir):
    # The scheduler and the HTTP door: tests/cluster/test_cluster.py drains workers through the same stop().
    cluster = Up(tmp_path, str(tiny_llama_dir), "--no-predictor", "--workers", "0")
    cluster.wait_ready()
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0
    assert "stopped (scheduler=0, http=0)" in cluster.stderr
    assert not (cluster.state_dir / "cluster.json").exists()


class _HealthServer:
    """Another program's gRPC server answering SERVING, on a port alise up is told to use."""

    def __enter__(self) -> int:
        from concurrent import futures

        from grpc_health.v1 import health

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self.port

    def __exit__(self, *exc) -> None:
        self.server.stop(0)


@pytest.mark.parametrize("flag", ["--address", "--worker-address", "--predictor-address"])
def test_a_taken_port_is_refused_by_name_before_anything_starts(tmp_path, tiny_llama_dir, flag):
    with _HealthServer() as port:
        command = [sys.executable, "-m", "alise.cli.main", "up", "--model", str(tiny_llama_dir),
                   "--state-dir", str(tmp_path), "--address", "127.0.0.1:0", "--worker-address", "127.0.0.1:0",
                   "--predictor-address", "127.0.0.1:0", "--worker-health-port", "0", flag, f"127.0.0.1:{port}"]
        start = time.monotonic()
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        print(f"alise up refused port {port} after {time.monotonic() - start:.1f} s")
    assert out.returncode == 1
    assert f"port {port} (127.0.0.1:{port}), for the " in out.stderr
    assert f"({flag}), is already in use by pid {os.getpid()}" in out.stderr
    assert "cluster ready" not in out.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started
