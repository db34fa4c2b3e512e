"""A kernel plan kept in a file is the plan it was, and only for the set-up it was made for."""

from __future__ import annotations

from alise.worker.kernels.triton_fused import SkinnyConfig
from alise.worker.kernels.triton_unified import UnifiedConfig
from alise.worker.model.kernel_plan import KernelPlan, plan_from_json, plan_to_json

KEY = dict(device="NVIDIA H200", dtype="torch.float16", hidden=5120, max_num_tokens=256)


def test_a_kept_plan_round_trips_and_is_refused_for_another_set_up():
    plan = KernelPlan(fused_norm=True, fused_rope=True, linear={(15360, 5120, 1): SkinnyConfig(vector=True),
                                                                (5120, 5120, 64): "cublaslt"},
                      decode_splits={8: 4, 64: 1}, fused_merge=True,
                      unified={64: UnifiedConfig(block_m=32), 256: UnifiedConfig(num_warps=8)},
                      unified_max_tokens=512, mixed_graph_tokens=(64, 128, 256), report=["chose things"])
    again = plan_from_json(plan_to_json(plan, KEY), KEY)
    for name in KernelPlan.__dataclass_fields__:
        if name != "report":
            assert getattr(again, name) == getattr(plan, name), name
    assert again.report == ["(loaded) chose things"]
    assert plan_from_json(plan_to_json(plan, KEY), {**KEY, "hidden": 4096}) is None
