"""`alise up`'s flags and what its services are given, without starting anything: vLLM's
engine flags reach every worker (and the scheduler, the door) as the same config, the
scheduling flags reach the scheduler as the same config, --host moves every listener, and a
service's log is bounded and survives a disk that refuses it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alise.cli.main import build_parser
from alise.cluster.config import ClusterConfig, listen_addresses, service_commands
from alise.cluster.logfiles import LogLimits, RotatingLog
from alise.cluster.main import config_from_args
from alise.core.config import SchedulingConfig
from alise.scheduler.main import config_from_args as scheduler_config_from_args
from alise.worker.main import config_from_args as worker_config_from_args


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([command, *argv])


def test_vllm_engine_flags_reach_every_worker_the_scheduler_and_the_door(tmp_path):
    cfg = config_from_args(parse("up", [
        "--workers", "2", "--state-dir", str(tmp_path), "--dtype", "half", "--seed", "7",
        "--gpu-memory-utilization", "0.5", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
        "--max-model-len", "512", "--served-model-name", "my-model"]))
    commands = service_commands(cfg)
    for name in ("worker-0", "worker-1"):
        # The worker parses what `alise up` gives it back into the same settings.
        worker = worker_config_from_args(build_parser().parse_args(commands[name]))
        assert (worker.dtype, worker.seed, worker.gpu_memory_utilization, worker.max_num_seqs,
                worker.max_num_batched_tokens, worker.max_model_len) == ("float16", 7, 0.5, 8, 64, 512)
    sched = commands["scheduler"]
    assert sched[sched.index("--max-model-len") + 1] == "512"
    http = commands["http"]
    assert http[http.index("--served-model-name") + 1] == "my-model"


def test_every_scheduling_knob_reaches_the_scheduler_as_the_same_config(tmp_path, monkeypatch):
    """The policy's knobs, the planner and the pace of planning, set on `alise up`, are the
    scheduler's config once it parses its command; so are its limits, and the workers' KV
    sizes are every worker's."""
    for name in ("ALISE_POLICY", "ALISE_KV_PLANNER"):
        monkeypatch.delenv(name, raising=False)
    cfg = config_from_args(parse("up", [
        "--state-dir", str(tmp_path), "--policy", "oracle", "--kv-planner", "swap",
        "--prefill-step-ratio", "0", "--plans-ahead", "4", "--overrun-growth", "1.5", "--aging-rate", "0.01",
        "--hysteresis", "0.1", "--switch-cost-s", "0.02", "--max-slowdown", "4", "--min-starve-s", "2",
        "--reserve-horizon-tokens", "16", "--reserve-fraction", "0.5", "--no-preemptive",
        "--max-queued", "10", "--default-max-tokens", "32", "--block-size", "4", "--num-device-blocks", "256",
        "--no-cuda-graphs"]))
    expected = SchedulingConfig(
        policy="oracle", kv_planner="swap", prefill_step_ratio=0.0, plans_ahead=4, overrun_growth=1.5,
        aging_rate=0.01, hysteresis=0.1, switch_cost_s=0.02, max_slowdown=4.0, min_starve_s=2.0,
        reserve_horizon_tokens=16, reserve_fraction=0.5, preemptive=False)
    assert cfg.scheduler.scheduling == expected
    commands = service_commands(cfg)
    scheduler = scheduler_config_from_args(build_parser().parse_args(commands["scheduler"]))
    assert scheduler.scheduling == expected
    assert (scheduler.max_queued, scheduler.default_max_tokens) == (10, 32)
    worker = worker_config_from_args(build_parser().parse_args(commands["worker-0"]))
    assert (worker.block_size, worker.num_device_blocks, worker.cuda_graphs) == (4, 256, False)


def test_defaults_are_the_services_own_and_are_not_repeated():
    """Flags left alone are not handed on: each service keeps its own default, written once
    in its config dataclass."""
    commands = service_commands(ClusterConfig())
    engine_flags = {"--dtype", "--seed", "--gpu-memory-utilization", "--max-num-seqs",
                    "--max-num-batched-tokens", "--max-model-len", "--served-model-name"}
    assert not engine_flags & {arg for argv in commands.values() for arg in argv}
    up, worker = parse("up", []), parse("worker", [])
    assert (up.max_num_seqs, up.gpu_memory_utilization) == (None, None)
    assert (worker.max_num_seqs, worker.gpu_memory_utilization, worker.dtype) == (64, 0.9, "auto")


@pytest.mark.parametrize("argv, says", [
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1], got 1.5"),
    (["--max-num-seqs", "64", "--max-num-batched-tokens", "8"], "max_num_batched_tokens (8) must be 0"),
    (["--max-model-len", "0"], "max_model_len must be >= 1"),
    (["--served-model-name", " "], "served_model_name must not be blank"),
    (["--http-health-address", ""], "http_health_address must be given when the HTTP door runs"),
    (["--hysteresis", "1.5"], "hysteresis must be in [0, 1), got 1.5"),
    (["--prefill-step-ratio", "0.5"], "prefill_step_ratio must be 0 (no cap) or > 1, got 0.5"),
    (["--max-queued", "0"], "max_queued must be >= 1, got 0"),
])
def test_a_bad_engine_flag_is_refused_before_anything_starts(tmp_path, argv, says):
    out = subprocess.run([sys.executable, "-m", "alise.cli.main", "up", "--state-dir", str(tmp_path / "s"), *argv],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"alise up: {out.stderr.strip().removeprefix('alise up: ')}"]
    assert says in out.stderr
    assert not (tmp_path / "s").exists()


def test_host_moves_every_listener_and_each_flag_still_overrides():
    commands = service_commands(ClusterConfig(host="0.0.0.0", metrics_base_port=9400, address="127.0.0.1:50051"))
    hosts = {(name, kind): address.rsplit(":", 1)[0] for name, argv in commands.items()
             for kind, address in listen_addresses(argv).items()}
    assert hosts.pop(("scheduler", "grpc")) == "127.0.0.1"
    assert set(hosts.values()) == {"0.0.0.0"}, hosts
    assert {kind for _, kind in hosts} == {"grpc", "workers", "health", "metrics"}
    # Services dial a wildcard listener through loopback.
    assert commands["worker-0"][commands["worker-0"].index("--scheduler") + 1] == "127.0.0.1:50052"


def test_a_log_rotates_by_size_and_keeps_its_backups(tmp_path):
    log = RotatingLog(str(tmp_path / "svc.log"), LogLimits(max_mb=100 / 2**20, backups=2))
    for i in range(10):
        log.write(f"line {i:02d} {'x' * 40}\n".encode())  # 49 bytes: two lines a file
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]
    assert (tmp_path / "svc.log").read_text().startswith("line 08")
    assert (tmp_path / "svc.log.2").read_text().startswith("line 04")
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())


def test_a_log_the_disk_refuses_drops_and_counts_its_lines(tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    (tmp_path / "svc.log").symlink_to("/dev/full")
    log = RotatingLog(str(tmp_path / "svc.log"))
    log.write(b"one\ntwo\n")
    log.write(b"three\n")
    assert (log.num_dropped_lines, log.last_error) == (3, os.strerror(28))


def test_the_state_dir_must_be_a_directory(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    out = subprocess.run([sys.executable, "-m", "alise.cli.main", "up", "--state-dir", str(not_a_dir)],
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr) == (2, f"alise up: --state-dir {not_a_dir} is not a directory\n")
    under = Path(not_a_dir, "state")
    out = subprocess.run([sys.executable, "-m", "alise.cli.main", "up", "--state-dir", str(under)],
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr) == (2, f"alise up: cannot use --state-dir {under}: Not a directory\n")


def test_grpcs_own_bind_failure_reads_as_one_line():
    """A port taken between the check and the bind: grpc's RuntimeError becomes the same kind
    of line; any other RuntimeError stays what it is."""
    import socket
    from concurrent import futures

    import grpc

    from alise.common.entrypoint import bind_failure

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = grpc.server(futures.ThreadPoolExecutor(1), options=[("grpc.so_reuseport", 0)])
        with pytest.raises(RuntimeError) as raised:
            server.add_insecure_port(f"127.0.0.1:{port}")
    assert bind_failure("scheduler", raised.value) == (
        f"alise scheduler: cannot listen on 127.0.0.1:{port}: the port is taken or the address is not this host's")
    assert bind_failure("scheduler", RuntimeError("something else")) is None


def test_port_puts_the_http_door_on_host_as_vllms_port_does_and_clashes_with_http_address(tmp_path):
    cfg = config_from_args(parse("up", ["--host", "0.0.0.0", "--port", "8123", "--state-dir", str(tmp_path)]))
    assert listen_addresses(service_commands(cfg)["http"])["grpc"] == "0.0.0.0:8123"
    with pytest.raises(ValueError, match="--port or --http-address, not both"):
        config_from_args(parse("up", ["--port", "8123", "--http-address", "127.0.0.1:9000"]))
    with pytest.raises(ValueError, match="99999"):
        config_from_args(parse("up", ["--port", "99999", "--state-dir", str(tmp_path)]))
