"""The smallest traces a person tries first: a single request, or a burst whose arrivals all
come at 0 s, rescaled to a rate (`alise sim --rates`, `alise bench --rate`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from alise.tools.trace import TraceRequest, rescale


def burst(n: int) -> list[TraceRequest]:
    return [TraceRequest(f"r{i}", "hi", 7, 5, 0.0) for i in range(n)]


@pytest.mark.parametrize("n", [1, 3])
def test_a_burst_rescaled_to_a_rate_arrives_at_that_rate(n):
    # All at 0 s, it has no span to stretch (its own rate is infinite): it is spread evenly.
    arrivals = [r.arrival_s for r in rescale(burst(n), 2.0)]
    assert all(math.isfinite(a) for a in arrivals)
    assert arrivals == [i / 2.0 for i in range(n)]


def test_a_burst_kept_a_burst_at_an_infinite_rate():
    assert [r.arrival_s for r in rescale(burst(3), math.inf)] == [0.0, 0.0, 0.0]


def test_alise_sim_of_a_single_request_at_0_s_finishes(tmp_path):
    trace = tmp_path / "one.jsonl"
    trace.write_text(json.dumps({"id": "r0", "prompt": "hi", "prompt_tokens": 2, "output_tokens": 3,
                                 "arrival_s": 0.0}) + "\n")
    # It ran forever: a rescaled arrival of 0 * inf = nan never came.
    out = subprocess.run([sys.executable, "-m", "alise.cli.main", "sim", "--trace", str(trace), "--policies",
                          "fcfs", "--rates", "1", "--json", str(tmp_path / "sim.json")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "sim.json").read_text())


def one_request(tmp_path) -> str:
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"id": "r0", "prompt": "hi", "prompt_tokens": 2, "output_tokens": 3,
                                 "arrival_s": 1.0}) + "\n")
    return str(trace)


@pytest.mark.parametrize("rates, fragment", [("0", "rates must be > 0, got 0"), ("abc", "rates must be numbers"),
                                             ("1,-2", "rates must be > 0, got -2")])
def test_alise_sim_refuses_a_rate_it_cannot_run_in_one_line(tmp_path, capsys, rates, fragment):
    from alise.cli.main import main

    assert main(["sim", "--trace", one_request(tmp_path), "--policies", "fcfs", f"--rates={rates}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alise sim: ") and fragment in err and err.count("\n") == 1, err


@pytest.mark.parametrize("num", ["0", "-2"])
def test_alise_bench_refuses_a_count_of_no_requests(tmp_path, capsys, num):
    # --num 0 replayed the whole trace, --num -2 all but its last two.
    from alise.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--trace", one_request(tmp_path), "--num", num])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(f"alise bench: error: argument --num: must be >= 1, got {num}\n")


def test_alise_bench_refuses_a_bad_address_in_one_line(tmp_path, capsys):
    from alise.cli.main import main

    assert main(["bench", "--trace", one_request(tmp_path), "--address", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alise bench: address must be HOST:PORT") and err.count("\n") == 1, err


@pytest.mark.parametrize("timeout", ["0", "-1", "inf"])
def test_alise_bench_refuses_a_deadline_that_is_no_time(tmp_path, capsys, timeout):
    # 0 ran every request without a deadline.
    from alise.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--trace", one_request(tmp_path), f"--timeout={timeout}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"alise bench: error: argument --timeout: must be > 0 seconds, got {timeout}\n")
