"""One config per concern, each default and check written once: every service's flags are
generated from its config's fields (same defaults, same choices, the field's comment as help),
and a config handed to a child as flags (`alise up`) comes back equal."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from alise.cli.main import build_parser
from alise.cluster.logfiles import LogLimits
from alise.cluster.main import LOG_FLAGS, RESTART_FLAGS
from alise.cluster.supervisor import RestartPolicy
from alise.common.entrypoint import (
    ConfigFlag,
    build_config,
    config_argv,
    config_flags,
    config_values,
    field_default,
    field_docs,
    field_owner,
)
from alise.common.security import SecurityConfig
from alise.core.choices import PLANNER_NAMES, POLICY_NAMES
from alise.core.config import SchedulingConfig
from alise.http import main as http_main
from alise.http.config import HttpConfig
from alise.predictor import cli as predictor_cli
from alise.predictor.config import PredictorConfig
from alise.scheduler import main as scheduler_main
from alise.scheduler.config import SchedulerConfig
from alise.tools.sim.flags import SCHEDULING_FLAGS as SIM_FLAGS
from alise.worker import main as worker_main
from alise.worker.config import WorkerConfig

PRODUCT = Path(__file__).resolve().parents[2] / "src" / "alise"

#: command -> (its config class, its flags)
COMMANDS = {
    "scheduler": (SchedulerConfig, scheduler_main.FLAGS),
    "worker": (WorkerConfig, worker_main.FLAGS),
    "http": (HttpConfig, http_main.flags()),
    "predictor serve": (PredictorConfig, predictor_cli.SERVE_FLAGS),
    "sim --trace t.jsonl": (SchedulingConfig, SIM_FLAGS),
    "up": (RestartPolicy, RESTART_FLAGS),
    "up ": (LogLimits, LOG_FLAGS),
}

#: A config of each service with every flagged field away from its default.
SCHEDULER = SchedulerConfig(
    address="127.0.0.1:7001", worker_address="127.0.0.1:7002", model="tiny-llama",
    scheduling=SchedulingConfig(policy="oracle", kv_planner="quantize", prefill_step_ratio=2.5, plans_ahead=1,
                                min_plans_ahead=1,
                                overrun_growth=3.0, aging_rate=0.5, hysteresis=0.0, switch_cost_s=0.01,
                                max_slowdown=8.0, min_starve_s=1.0, reserve_horizon_tokens=0,
                                reserve_fraction=0.0, preemptive=False),
    state_dir="/tmp/state", predictor_address="127.0.0.1:7003", predictor_timeout_s=1.0,
    latency_profile="p.json", max_model_len=512, default_max_tokens=8, max_queued=9, max_calls=10,
    max_wait_no_worker_s=2.0, max_prompt_chars=100, drain_grace_s=1.0, job_log="jobs.jsonl",
    metrics_address="127.0.0.1:7004", streams_process=True)
WORKER = WorkerConfig(
    scheduler_address="10.0.0.1:1", model="tiny-llama", device="cuda:1", dtype="bfloat16", seed=3,
    gpu_memory_utilization=0.5, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, block_size=4,
    kv_cache_dtype="fp8_e4m3", num_device_blocks=100, kv_cache_mib=64, num_host_blocks=10, worker_id="w",
    health_address="",
    reconnect_delay_s=0.5, orphan_ttl_s=0.0, latency_profile="p.json", profile_latency=True,
    step_log="s.jsonl", cuda_graphs=False, async_steps=False, fast_kernels=False, kernel_plan="k.json",
    metrics_address=":9")


def http_config(tmp_path: Path) -> HttpConfig:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("")
    return HttpConfig(
        scheduler_address="10.0.0.1:1", address="127.0.0.1:9000", served_model_name="m", model="tiny-llama",
        health_address="127.0.0.1:9001", request_timeout_s=5.0, max_body_bytes=10, max_connections=11,
        max_idle_connections_per_client=12, header_timeout_s=1.0, body_timeout_s=2.0, max_header_bytes=13,
        keep_alive_timeout_s=3.0, scheduler_wait_s=4.0, accept_timeout_s=0.5, health_interval_s=0.25,
        health_timeout_s=0.75, health_failures=5, drain_grace_s=6.0,
        scheduler_tls_ca=str(tmp_path / "ca.pem"), tls_cert=str(tmp_path / "cert.pem"),
        tls_key=str(tmp_path / "key.pem"))


PREDICTOR = PredictorConfig(
    address="127.0.0.1:9002", index_dir="idx", encoder_path="enc", tokenizer_path="tok", bootstrap=("a", "b"),
    model="m", refit_interval_s=1.0, refit_after_observations=2, snapshot_interval_s=3.0,
    wal_sync_delay_ms=4.0, max_pending_predictions=5, max_observations_per_s=6.0, batch_window_ms=7.0,
    max_batch_prompts=8, max_prompts_per_request=9, ivf_threshold=10, num_threads=3,
    encoder_max_seq_length=64, encoder_int8=False, encoder_layers=2, drain_grace_s=1.0,
    metrics_address="127.0.0.1:9003")
#: command -> (configs that between them set every flag, the module that parses them)
ROUND_TRIPS = {"scheduler": ([SCHEDULER], scheduler_main),
               "worker": ([WORKER, WorkerConfig(runner="transformers", enable_prefix_caching=False),
                           WorkerConfig(tensor_parallel_size=2)], worker_main),
               "http": ([http_config], http_main), "predictor serve": ([PREDICTOR], None)}


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch):
    for _, flags in COMMANDS.values():
        for flag in flags:
            if flag.env:
                monkeypatch.delenv(flag.env, raising=False)
    for name in ("ALISE_INTERNAL_SECRET", "ALISE_API_TOKENS", "ALISE_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def parse(command: str, argv: list[str] = ()):
    return build_parser().parse_args([*command.split(), *argv])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_flag_defaults_to_its_fields_default_and_offers_its_choices(command):
    cls, flags = COMMANDS[command]
    args = parse(command)
    parser_actions = {a.dest: a for a in _subparser(command)._actions}
    for flag in flags:
        default = field_default(cls, flag.field)
        parsed = getattr(args, flag.dest)
        if isinstance(default, tuple):  # a repeatable flag: None until given
            parsed = () if parsed is None else parsed
        assert parsed == default, f"alise {command} {flag.option}: {parsed!r}, the field's {default!r}"
        owner, field = field_owner(cls, flag.field)
        assert field_docs(owner).get(field.name), f"{owner.__name__}.{field.name}: no #: comment for its help"
        choices = parser_actions[flag.dest].choices
        if flag.dest in ("policy", "kv_planner"):
            assert tuple(choices) == (POLICY_NAMES if flag.dest == "policy" else PLANNER_NAMES)


def _subparser(command: str):
    import argparse

    parser = build_parser()
    for name in command.split()[:2]:
        if name.startswith("-"):
            break
        [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", sorted(ROUND_TRIPS))
def test_a_config_handed_on_as_flags_comes_back_equal(command, tmp_path):
    """What `alise up` does for each child: the flags of a config parse back into it. Every
    flag is exercised (each field differs from its default in one of the configs), so a new
    field without a flag, or a flag that loses its value, fails here."""
    made, module = ROUND_TRIPS[command]
    configs = [c(tmp_path) if callable(c) else c for c in made]
    cls, flags = COMMANDS[command]
    unchanged = [f.field for f in flags
                 if all(_value(c, f.field) == field_default(cls, f.field) for c in configs)]
    assert not unchanged, f"set these away from their defaults here: {unchanged}"
    for config in configs:
        argv = config_argv(config, flags)
        args = parse(command, argv)
        if module is None:
            back = build_config(cls, config_values(args, flags), security=SecurityConfig())
        else:
            back = module.config_from_args(args)
        assert back == config, argv


def _value(config, path: str):
    for name in path.split("."):
        config = getattr(config, name)
    return config


def test_scheduling_is_checked_once_with_the_field_and_value_in_the_message():
    for kwargs, says in ((dict(policy="sjf"), "policy must be one of fcfs, alise, oracle, got 'sjf'"),
                         (dict(kv_planner=""), "kv_planner must be one of adaptive, drop, swap, quantize"),
                         (dict(prefill_step_ratio=1.0), "prefill_step_ratio must be 0 (no cap) or > 1"),
                         (dict(plans_ahead=0), "plans_ahead must be >= 1, got 0"),
                         (dict(min_plans_ahead=0), "min_plans_ahead must be >= 1, got 0"),
                         (dict(aging_rate=-1.0), "aging_rate must be >= 0, got -1.0"),
                         (dict(hysteresis=1.0), "hysteresis must be in [0, 1), got 1.0"),
                         (dict(max_slowdown=0.0), "max_slowdown must be > 0 or None, got 0.0"),
                         (dict(reserve_fraction=2.0), "reserve_fraction must be in [0, 1], got 2.0"),
                         (dict(overrun_growth=0.5), "overrun_growth must be >= 1, got 0.5")):
        with pytest.raises(ValueError) as raised:
            SchedulingConfig(**kwargs)
        assert says in str(raised.value)
    out = build_parser().parse_args(["scheduler", "--hysteresis", "1"])
    with pytest.raises(ValueError, match=r"hysteresis must be in \[0, 1\), got 1.0"):
        scheduler_main.config_from_args(out)


@pytest.mark.parametrize("config", [SchedulerConfig, WorkerConfig, HttpConfig])
def test_a_model_that_is_neither_a_directory_nor_a_preset_is_refused_by_each_services_config(config, tmp_path):
    model = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"^model: model '{model}' is neither a local model directory nor a preset"):
        config(model=model)
    assert config(model="tiny-llama").model == "tiny-llama"


def test_the_prefill_step_ratio_default_is_written_once_in_the_product():
    """The literal of SchedulingConfig's default, beside the setting's name, in one place."""
    default = re.escape(repr(SchedulingConfig.prefill_step_ratio))
    pattern = re.compile(rf"(prefill_step_ratio|prefill-step-ratio)\b[^\n]*\b{default}\b")
    found = [f"{path.relative_to(PRODUCT)}:{n}" for path in sorted(PRODUCT.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert [place.split(":")[0] for place in found] == ["core/config.py"], found


def test_a_scheduling_knob_set_on_up_is_the_schedulers_and_no_more():
    """`alise up` hands on only what was given, as the scheduler's own flags."""
    from alise.cluster.config import ClusterConfig, service_commands

    plain = service_commands(ClusterConfig())["scheduler"]
    given = service_commands(ClusterConfig(scheduler=SchedulerConfig(
        scheduling=SchedulingConfig(aging_rate=0.1, preemptive=False))))["scheduler"]
    assert [a for a in given if a not in plain] == ["--aging-rate", "0.1", "--no-preemptive"]


def test_flags_are_only_made_for_fields_that_exist_and_can_be_set():
    with pytest.raises(TypeError, match="no flagged field"):
        config_flags(SchedulingConfig, ConfigFlag("ageing_rate"))

    @dataclasses.dataclass(frozen=True)
    class Odd:
        #: An optional setting whose default is not None: no flag could give it None back.
        limit: int | None = 3

    with pytest.raises(TypeError, match="default must be None"):
        config_flags(Odd)
