"""The fused layer kernels (add + norm, rotary + page write, skinny matmul) against torch, under
the Triton interpreter, outputs poisoned with NaN first.

References are the torch ops the runner uses without them (transformers' LayerNorm,
``LlamaRMSNorm`` and ``Gemma2RMSNorm``, the rotate-half rotary form, ``write_kv``, ``F.linear``,
SiLU and GELU-tanh), computed in float32
on the same (rounded) inputs; bounds are the dtype's rounding. Negative controls: a norm with the
wrong epsilon scale, a key written to the wrong slot.

Run: ``pip install -e '.[kernels]'`` then ``pytest tests/unit/test_fused_kernels.py`` (a few
seconds; skipped where Triton is missing or a GPU is present).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernelkit import TOLERANCE, interpreted, relative_error
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from alise.worker.model.attention import write_kv

fused = interpreted("alise.worker.kernels.triton_fused")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kind", ["layer", "rms", "rms_unit_offset"], ids=["layernorm", "rmsnorm", "gemma-rmsnorm"])
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "norm-only"])
def test_add_norm_matches_torch(dtype: torch.dtype, kind: str, with_delta: bool) -> None:
    torch.manual_seed(hash((str(dtype), kind, with_delta)) & 0xFFFF)
    rows, cols = 7, 200  # not a power of two: the tail is masked
    rms = kind != "layer"
    hidden = (torch.randn(rows, cols) * 3).to(dtype)
    delta = torch.randn(rows, cols).to(dtype) if with_delta else None
    weight = ((0 if kind == "rms_unit_offset" else 1) + torch.randn(cols) * 0.1).to(dtype)
    bias = None if rms else (torch.randn(cols) * 0.1).to(dtype)
    total, out = fused.add_norm(hidden, delta, weight, bias, 1e-5, kind=kind)
    expect_total = hidden + delta if with_delta else hidden
    # The residual is the dtype's own sum, bit for bit; except that the interpreter's float32 ->
    # bf16 cast truncates where the GPU rounds to nearest, so there it may sit one step lower.
    ulp = torch.finfo(dtype).eps * expect_total.float().abs() if dtype == torch.bfloat16 else 0.0
    assert ((total.float() - expect_total.float()).abs() <= ulp).all()
    h = expect_total.float()
    if rms:
        norm = LlamaRMSNorm(cols, eps=1e-5) if kind == "rms" else Gemma2RMSNorm(cols, eps=1e-5)
        norm.weight.data = weight.float()
        expect = norm(h)
        # Negative control: the other RMSNorm (weight vs 1 + weight) misses the same bound.
        other = Gemma2RMSNorm(cols, eps=1e-5) if kind == "rms" else LlamaRMSNorm(cols, eps=1e-5)
        other.weight.data = weight.float()
        assert relative_error(out, other(h)) > 10 * TOLERANCE[dtype]
    else:
        expect = F.layer_norm(h, (cols,), weight.float(), bias.float(), 1e-5)
    assert not out.isnan().any()
    assert relative_error(out, expect) < TOLERANCE[dtype]
    if not rms:  # negative control: a visibly different norm misses the same bound
        wrong = F.layer_norm(h, (cols,), weight.float(), bias.float(), 10.0)
        assert relative_error(out, wrong) > 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rope_write_kv_matches_the_torch_form(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    tokens, heads, kv_heads, head_dim, num_blocks, block_size = 6, 4, 2, 16, 5, 4
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim).to(dtype)  # strided views, as in the runner
    query, key, value = qkv.split([heads, kv_heads, kv_heads], dim=1)
    angles = torch.randn(tokens, head_dim // 2).repeat(1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.tensor([3, 17, -1, 0, 9, 12])
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(4)]
    q_out = fused.rope_write_kv(query, key, value, cos, sin, caches[0], caches[1], slots)
    c, s = cos[:, None, :], sin[:, None, :]
    q_ref = query * c + rotate_half(query) * s
    k_ref = key * c + rotate_half(key) * s
    write_kv(caches[2], caches[3], k_ref, value, slots)
    assert not q_out.isnan().any()
    assert relative_error(q_out, q_ref) < TOLERANCE[dtype]
    written = caches[0].view(-1, kv_heads, head_dim)[slots[slots >= 0]]
    assert not written.isnan().any()
    assert relative_error(written, caches[2].view(-1, kv_heads, head_dim)[slots[slots >= 0]]) < TOLERANCE[dtype]
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))  # values copied exactly
    assert int(caches[0].isnan().all(dim=(2, 3)).sum()) == num_blocks * block_size - 5  # nothing else written
    # Negative control: the key of token 1 read from another token's slot misses the bound.
    other = caches[0].view(-1, kv_heads, head_dim)[3]
    assert relative_error(other, k_ref[1]) > 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(("rows", "relu", "with_bias", "config"), [
    (1, False, True, 0), (3, True, True, 1), (16, False, False, 2), (13, True, True, 3), (1, True, True, 4),
    (1, False, False, 5),
], ids=["b1-bias", "b3-relu", "b16-nobias", "b13-bias-relu", "b1-vector-relu", "b1-vector-nobias"])
def test_skinny_linear_matches_f_linear(dtype: torch.dtype, rows: int, relu: bool, with_bias: bool,
                                        config: int) -> None:
    torch.manual_seed(rows)
    k, n = 300, 72  # neither a multiple of the tiles
    x = torch.randn(rows, k).to(dtype)
    weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    out = fused.skinny_linear(x, weight, bias, relu=relu, config=fused.SKINNY_CANDIDATES[config])
    expect = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if relu:
        expect = expect.relu()
    assert out.shape == (rows, n) and out.dtype == dtype and not out.isnan().any()
    assert relative_error(out, expect) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_mul_matches_torch(dtype: torch.dtype, activation: str) -> None:
    torch.manual_seed(9)
    gate_up = (torch.randn(5, 2 * 1100) * 3).to(dtype)  # two column tiles, the second partial
    out = fused.act_mul(gate_up, activation)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu if activation == "silu" else lambda x: F.gelu(x, approximate="tanh")
    expect = act(gate.float()).to(dtype).float() * up.float()
    assert out.shape == (5, 1100) and not out.isnan().any()
    assert relative_error(out, expect) < TOLERANCE[dtype]
    assert relative_error(out, act(up.float()) * gate.float()) > 10 * TOLERANCE[dtype]  # halves swapped
    other = F.gelu if activation == "silu" else F.silu  # the other activation misses the bound
    assert relative_error(out, other(gate.float()) * up.float()) > 2 * TOLERANCE[dtype]


def test_skinny_linear_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at most 16 rows"):
        fused.skinny_linear(torch.randn(17, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="a vector configuration takes one row"):
        fused.skinny_linear(torch.randn(2, 8), torch.randn(4, 8), config=fused.SKINNY_CANDIDATES[4])
    with pytest.raises(ValueError, match="do not chain"):
        fused.skinny_linear(torch.randn(2, 8), torch.randn(4, 9))
