"""The kernel plan's cuDNN choice for long fresh prompts: kept in the plan file, chosen by timing
only where cuDNN matched the reference, and given up where its plans cannot be built."""

from __future__ import annotations

import json
import math

import pytest

from alise.worker.model.kernel_plan import KernelPlan, plan_from_json, plan_to_json
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from alise.worker.model.tuning import choose_fresh_path, warm_cudnn_fresh

KEY = dict(device="NVIDIA H100 80GB HBM3", dtype="torch.float16", hidden=5120, max_num_tokens=256)


def test_the_padded_lengths_round_trip_and_an_older_file_loads_without_cudnn() -> None:
    plan = KernelPlan(unified_max_tokens=256, cudnn_fresh_lengths=(256, 512, 768, 1024))
    assert plan_from_json(plan_to_json(plan, KEY), KEY).cudnn_fresh_lengths == (256, 512, 768, 1024)
    older = json.loads(plan_to_json(plan, KEY))
    del older["cudnn_fresh_lengths"]  # written before the choice existed: it measured flash SDPA only
    kept = plan_from_json(json.dumps(older), KEY)
    assert kept.cudnn_fresh_lengths == () and kept.unified_max_tokens == 256


@pytest.mark.parametrize(("times", "err", "choice"), [
    (dict(unified=3.0, flash=2.0, cudnn=1.0), 1e-3, "cudnn"),
    (dict(unified=3.0, flash=2.0, cudnn=1.0), 5e-3, "flash"),  # beyond the tolerance
    (dict(unified=3.0, flash=2.0, cudnn=1.0), math.nan, "flash"),
    (dict(unified=3.0, flash=2.0, cudnn=1.0), None, "flash"),  # unchecked
    (dict(unified=1.0, flash=2.0, cudnn=1.5), 1e-3, "unified"),
    (dict(unified=3.0, flash=1.0, cudnn=2.0), 1e-3, "flash"),
    (dict(unified=3.0, flash=2.0), None, "flash"),  # not timed: no cuDNN here
    (dict(unified=0.5, flash=2.0), None, "unified"),
])
def test_the_fastest_path_wins_and_cudnn_only_after_its_check(times: dict, err: float | None, choice: str) -> None:
    assert choose_fresh_path(times, err, tol=3e-3) == choice


def test_cudnn_plans_that_cannot_be_built_leave_fresh_prompts_on_flash(tiny_opt_dir, caplog) -> None:
    runner = ModelRunner(load_model(str(tiny_opt_dir)), num_blocks=8, block_size=16, fast_kernels=False,
                         use_cuda_graphs=False)
    plan = KernelPlan(cudnn_fresh_lengths=(256, 512))
    with caplog.at_level("INFO", logger="alise.worker.model.tuning"):
        warm_cudnn_fresh(runner, plan)  # the CPU has no cuDNN: the first length raises
    assert plan.cudnn_fresh_lengths == ()
    assert "fresh prompts on flash SDPA" in plan.report[-1] and plan.report[-1] in caplog.text
