"""The fused layer kernels, compiled, against torch at the served model shapes. CUDA only.

add + norm (LayerNorm and RMSNorm, fp16 and bf16): the residual sum equals torch's bit for bit,
the norm is within the dtype's rounding of the float32 reference. Rotary + page write: within
rounding of the rotate-half form, only the given slots written. Skinny matmul: every launch
configuration at 1-16 rows with bias and ReLU epilogues against float32 ``F.linear``. Outputs are
poisoned (NaN) first; inputs are fresh random draws.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernelcases import relative_error

# Before any kernel module is imported: on a machine without CUDA the interpreter tests of
# tests/unit import them (compiled for the interpreter) in this same process.
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

triton_attention = pytest.importorskip("alise.worker.kernels.triton_attention")
pytestmark = pytest.mark.skipif(not triton_attention.is_available(), reason="needs CUDA and Triton")
from alise.worker.kernels import triton_fused  # noqa: E402
from alise.worker.model import attention as ref_attention  # noqa: E402
from alise.worker.model.kernel_plan import rotate_half  # noqa: E402

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["layer", "rms", "rms_unit_offset"])
@pytest.mark.parametrize("cols", [5120, 4096, 200])
def test_add_norm(dtype: torch.dtype, kind: str, cols: int) -> None:
    from alise.worker.model.kernel_plan import reference_norm

    torch.manual_seed(cols + len(kind))
    rows = 37
    hidden = (torch.randn(rows, cols, device="cuda") * 4).to(dtype)
    delta = torch.randn(rows, cols, device="cuda").to(dtype)
    weight = (1 + 0.1 * torch.randn(cols, device="cuda")).to(dtype)
    bias = None if kind != "layer" else (0.1 * torch.randn(cols, device="cuda")).to(dtype)
    total, out = triton_fused.add_norm(hidden, delta, weight, bias, 1e-5, kind=kind)
    assert torch.equal(total, hidden + delta)
    assert not out.isnan().any()
    assert relative_error(out, reference_norm(hidden + delta, weight, bias, 1e-5, kind)) < TOLERANCE[dtype]
    _, alone = triton_fused.add_norm(hidden, None, weight, bias, 1e-5, kind=kind)
    assert relative_error(alone, reference_norm(hidden, weight, bias, 1e-5, kind)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(32, 8, 128), (40, 40, 128), (8, 2, 64)])
def test_rope_write_kv(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    torch.manual_seed(heads)
    tokens, num_blocks, block_size = 50, 8, 16
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device="cuda").to(dtype)
    query, key, value = qkv.split([heads, kv_heads, kv_heads], dim=1)
    angles = (torch.arange(tokens, device="cuda")[:, None] * torch.rand(head_dim // 2, device="cuda")).repeat(1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[::9] = -1
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), device="cuda", dtype=dtype)
              for _ in range(4)]
    q_out = triton_fused.rope_write_kv(query, key, value, cos, sin, caches[0], caches[1], slots)
    c, s = cos[:, None, :], sin[:, None, :]
    ref_attention.write_kv(caches[2], caches[3], key * c + rotate_half(key) * s, value, slots)
    assert relative_error(q_out, query * c + rotate_half(query) * s) < TOLERANCE[dtype]
    kept = slots[slots >= 0]
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        flat_got, flat_want = got.view(-1, kv_heads, head_dim), want.view(-1, kv_heads, head_dim)
        assert not flat_got[kept].isnan().any()
        assert relative_error(flat_got[kept], flat_want[kept]) < TOLERANCE[dtype]
    assert int(caches[0].isnan().all(dim=(2, 3)).sum()) == num_blocks * block_size - kept.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize(("n", "k", "relu", "with_bias"), [(15360, 5120, False, True), (5120, 20480, False, True),
                                                           (20480, 5120, True, True), (2816, 1024, False, False)],
                         ids=["qkv", "fc2", "fc1-relu", "llama-nobias"])
def test_skinny_linear(dtype: torch.dtype, n: int, k: int, relu: bool, with_bias: bool) -> None:
    torch.manual_seed(n + k)
    weight = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    # Every configuration on the first shape, the default on the others (each one is a compile).
    configs = triton_fused.SKINNY_CANDIDATES if n == 15360 else triton_fused.SKINNY_CANDIDATES[:1]
    for config in configs:
        for rows in (1,) if config.vector else (1, 5, 16):
            x = torch.randn(rows, k, device="cuda").to(dtype)
            out = triton_fused.skinny_linear(x, weight, bias, relu=relu, config=config)
            expect = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
            expect = expect.relu() if relu else expect
            assert not out.isnan().any()
            err = relative_error(out, expect)
            assert err < TOLERANCE[dtype], f"{config} rows {rows}: rel err {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_mul(dtype: torch.dtype, activation: str) -> None:
    torch.manual_seed(3)
    gate_up = (torch.randn(40, 2 * 13824, device="cuda") * 3).to(dtype)  # Llama-13B's intermediate size
    out = triton_fused.act_mul(gate_up, activation)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu if activation == "silu" else lambda x: F.gelu(x, approximate="tanh")
    assert not out.isnan().any()
    assert relative_error(out, act(gate).float() * up.float()) < TOLERANCE[dtype]
