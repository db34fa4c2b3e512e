"""`alise sim` and `alise bench` given a file they cannot use, or a server that is not there,
say so in one line naming it and exit non-zero; no traceback."""

from __future__ import annotations

import json
import socket

import pytest

from alise.cli.main import main

RECORD = {"id": "r0", "prompt": "hi", "prompt_tokens": 2, "output_tokens": 3, "arrival_s": 0.0}


def bad_files(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, what the message must hold)"""
    files = {"not json": "not json\n", "a record without its id": json.dumps({"prompt": "x"}) + "\n",
             "not an object": "[1, 2]\n", "a bad number": json.dumps({**RECORD, "prompt_tokens": "many"}) + "\n",
             "too deep": "[" * 100_000 + "]" * 100_000 + "\n", "empty": ""}
    out = {"missing": (str(tmp_path / "missing.jsonl"), "No such file or directory"),
           "a directory": (str(tmp_path), "Is a directory")}
    for i, (name, text) in enumerate(files.items()):
        path = tmp_path / f"{i}.jsonl"
        path.write_text(text)
        out[name] = (str(path), f"{path}:1" if name != "empty" else f"{path}: empty trace")
    return out


@pytest.mark.parametrize("case", ["missing", "a directory", "not json", "a record without its id", "not an object",
                                  "a bad number", "too deep", "empty"])
@pytest.mark.parametrize("command", [["sim", "--policies", "fcfs", "--rates", "1"],
                                     ["bench", "--address", "127.0.0.1:9"]])
def test_a_trace_that_cannot_be_read_is_one_line(tmp_path, capsys, command, case):
    path, fragment = bad_files(tmp_path)[case]
    assert main([*command, "--trace", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alise {command[0]}: ") and err.count("\n") == 1, err
    assert fragment in err


def test_a_latency_profile_that_cannot_be_read_is_one_line(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(RECORD) + "\n")
    assert main(["sim", "--trace", str(trace), "--profile", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alise sim: ") and "none.json" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("case", ["missing", "not json", "not a run"])
def test_bench_compare_of_a_file_that_is_not_a_run_is_one_line(tmp_path, capsys, case):
    path = tmp_path / "run.json"
    if case != "missing":
        path.write_text("{" if case == "not json" else json.dumps({"settings": {}}))
    assert main(["bench", "--compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alise bench: {path}") and err.count("\n") == 1, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:{port}", "notaurl"])
def test_bench_against_no_openai_server_is_one_line(tmp_path, capsys, base_url):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(RECORD) + "\n")
    url = base_url.format(port=_closed_port())
    assert main(["bench", "--trace", str(trace), "--backend", "openai", "--base-url", url,
                 "--max-tokens", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"alise bench: GET {url}/v1/models: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("command, case", [("eval", "missing"), ("eval", "not json"), ("build", "not json")])
def test_predictor_data_that_cannot_be_read_is_one_line(tmp_path, capsys, command, case):
    path = tmp_path / "data.jsonl"
    if case == "not json":
        path.write_text("not json\n")
    index = ["--index-dir", str(tmp_path / "index")] if command == "build" else []
    assert main(["predictor", command, "--data", str(path), *index]) == 2
    # build loads the encoder first, whose loading may draw a progress bar before the message
    last = capsys.readouterr().err.split("\n")[-2]
    assert last.startswith(f"alise predictor {command}: error: ") and str(path) in last, last


def _unwritable(tmp_path, case: str) -> str:
    if case == "a directory":
        return str(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return str(blocker / "out.json")  # under a file: no directory can be made there


@pytest.mark.parametrize("case", ["a directory", "under a file"])
@pytest.mark.parametrize("command, flag", [(["trace", "--workload", "chat", "--num", "3"], "--out"),
                                           (["sim", "--policies", "fcfs", "--rates", "1"], "--json"),
                                           (["sim", "--policies", "fcfs", "--rates", "1"], "--png"),
                                           (["bench", "--address", "127.0.0.1:9", "--no-progress"], "--json"),
                                           (["bench", "--address", "127.0.0.1:9", "--no-progress"], "--out"),
                                           (["predictor", "eval"], "--json")])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, command, flag, case):
    # Each wrote its file last: bench ran the whole benchmark, then died with a traceback.
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(RECORD) + "\n")
    source = {"trace": [], "predictor": ["--data", str(trace)]}.get(command[0], ["--trace", str(trace)])
    path = _unwritable(tmp_path, case)
    with pytest.raises(SystemExit) as info:
        main([*command, *source, flag, path])
    assert info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"alise {' '.join(command[:2 if command[0] == 'predictor' else 1])}: error: "
                           f"argument {flag}") and path in last, last
