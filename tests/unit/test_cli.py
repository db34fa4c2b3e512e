"""The `alise` command explains itself: every flag of the commands below has help text that
gives its default, and no choice list offers an empty value."""

from __future__ import annotations

import argparse

import pytest

from alise.cli.main import build_parser

COMMANDS = ["generate", "status", "health", "up", "scheduler", "worker", "http", "predictor build",
            "predictor eval", "predictor serve", "sim"]


def subparser(path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path.split():
        [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path", COMMANDS)
def test_every_flag_has_help_that_gives_its_default(path):
    parser = subparser(path)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"alise {path} {name}: no help text"
        shown = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog}
        if action.nargs == 0 or action.required or not action.option_strings or action.default == []:
            continue  # switches, required values, positionals and repeatable lists say it all
        if action.default is None:
            assert "default" in shown.lower(), f"alise {path} {name}: what happens without it?"
        else:
            assert str(action.default) in shown, f"alise {path} {name}: default {action.default!r} not shown"
        assert "" not in (action.choices or ()), f"alise {path} {name} offers an empty choice"


def test_the_product_policy_is_the_default(monkeypatch):
    from alise.cluster.config import service_commands
    from alise.cluster.main import config_from_args

    monkeypatch.delenv("ALISE_POLICY", raising=False)
    up = config_from_args(subparser("up").parse_args([]))
    assert up.policy == "alise"
    scheduler = service_commands(up)["scheduler"]
    assert scheduler[scheduler.index("--policy") + 1] == "alise"  # named, though the default
    assert subparser("scheduler").parse_args([]).policy == "alise"
    assert subparser("scheduler").parse_args([]).kv_planner is None  # by policy


def test_health_defaults_to_the_scheduler_and_takes_the_client_options():
    args = subparser("health").parse_args(["--tls-ca", "ca.pem", "--token", "t"])
    assert (args.address, args.address_option, args.tls_ca, args.token) == (None, "127.0.0.1:50051", "ca.pem", "t")


def test_up_groups_its_flags_and_shares_the_workers_engine_flags():
    up, worker = subparser("up"), subparser("worker")
    groups = {g.title: {a.option_strings[0] for a in g._group_actions} for g in up._action_groups}
    engine = groups["model and workers (vLLM's flag names; every worker gets them)"]
    vllm = {"--dtype", "--seed", "--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens",
            "--max-model-len"}
    assert vllm | {"--block-size", "--num-device-blocks", "--kv-cache-mib"} <= engine
    assert "--served-model-name" in groups["HTTP door (`alise http`'s flags)"]
    scheduling = groups["scheduling (the same flags as `alise scheduler` and `alise sim`)"]
    assert {"--policy", "--kv-planner", "--prefill-step-ratio", "--plans-ahead", "--aging-rate",
            "--hysteresis", "--reserve-horizon-tokens", "--preemptive"} <= scheduling
    assert {"--max-queued", "--default-max-tokens"} <= groups["scheduler (`alise scheduler`'s flags)"]
    assert {"--host", "--address", "--http-address"} <= groups["listeners (port 0 = any free port)"]
    assert {"--hang-timeout", "--log-max-mb", "--log-backups"} <= groups["supervision and logs"]
    # The worker's own flags have the defaults that `alise up` names in its help.
    defaults = worker.parse_args([])
    for action in up._actions:
        if action.dest in ("dtype", "seed", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens"):
            assert f"(default: the workers', {getattr(defaults, action.dest)})" in action.help


@pytest.mark.parametrize("argv, prog", [(["generate", "hi", "--port", "8000"], "alise generate"),
                                        (["up", "--bogus", "8000"], "alise up"),
                                        (["predictor", "eval", "--data", "x", "--bogus"], "alise predictor eval")])
def test_an_unknown_flag_is_named_by_the_command_that_got_it(capsys, argv, prog):
    from alise.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {prog} ") and err.endswith(f"{prog}: error: unrecognized arguments: "
                                                              f"{' '.join(argv[-2 if argv[-1] == '8000' else -1:])}\n")


def test_a_reader_that_went_away_is_no_traceback(tmp_path):
    # `alise sim ... | head`: head exits, stdout's pipe has no reader.
    import json
    import os
    import subprocess
    import sys

    trace = tmp_path / "one.jsonl"
    trace.write_text(json.dumps({"id": "r0", "prompt": "hi", "prompt_tokens": 2, "output_tokens": 3,
                                 "arrival_s": 1.0}) + "\n")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([sys.executable, "-m", "alise.cli.main", "sim", "--trace", str(trace), "--policies",
                              "fcfs", "--rates", "1", "--no-progress"], stdout=write_end, stderr=subprocess.PIPE,
                             text=True, timeout=60, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


@pytest.mark.parametrize("argv", [["generate", "hi", "--timeout", "0"], ["generate", "hi", "--timeout", "-1"],
                                  ["health", "--timeout", "0"], ["health", "--timeout", "nan"]])
def test_a_timeout_that_is_no_time_is_refused(capsys, argv):
    # generate --timeout 0 ran without a deadline; health --timeout 0 said DEADLINE_EXCEEDED.
    from alise.cli.main import main

    with pytest.raises(SystemExit) as info:
        main([*argv, "--address", "127.0.0.1:9"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: argument --timeout: must be > 0 seconds, got {argv[-1]}\n")


@pytest.mark.parametrize("model", ["/nonexistent/model-dir", "tiny-lama"])
def test_alise_up_refuses_a_model_it_cannot_find_before_starting_anything(capsys, tmp_path, model):
    # It started the predictor, then the scheduler died and its log's traceback was shown.
    from alise.cli.main import main

    assert main(["up", "--model", model, "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alise up: model: model '{model}' is neither a local model directory nor a preset")
    assert err.count("\n") == 1 and not (tmp_path / "logs").exists()


def test_health_of_an_http1_server_says_it_is_one(capsys):
    # It said "nothing answers there: is the service running?" of the HTTP door's own port.
    import http.server
    import threading

    from alise.cli.main import main

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["health", address, "--timeout", "5"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert err.startswith(f"alise: {address}: UNAVAILABLE {address} answers HTTP/1, not gRPC"), err
