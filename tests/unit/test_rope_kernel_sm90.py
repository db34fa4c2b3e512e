"""The fused rotary + page write, as ``rope_write_kv`` launches it, compiled for the H100/H200
(sm_90) on a machine with no GPU: every product of the rotation is rounded before the sum.

The torch rotation (``x * cos + rotate_half(x) * sin`` in the model's dtype) rounds each product,
then the sum. Compiled, the kernel's products of two 16-bit values become 16-bit multiplies; with
floating-point fusion on, one of each pair merges with the sum into a multiply-add that skips a
rounding, and the rotated query and key (and the fp8 codes of the key) differ from torch's. The
interpreter computes in numpy, one rounding per operation, and cannot show it; the generated
code can. The launch is intercepted and compiled with Triton's own sm_90 pipeline in a clean
process (the interpreter tests of this session turn compilation off in theirs). A few seconds;
skipped where Triton is missing. tests/gpu/test_gpu_fp8_kv.py checks the bytes on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

#: Runs ``rope_write_kv`` on CPU tensors with its kernel's launch replaced by an sm_90 compile of
#: the same arguments and options; prints the PTX's floating-point arithmetic opcodes per case.
_SCRIPT = r"""
import collections, json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from alise.worker.kernels import triton_fused

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv", torch.int64: "i64"}
kernel = triton_fused._rope_write_kernel
ptx = {}

def compile_launch(*args, grid, warmup, **kwargs):
    names = kernel.arg_names
    const = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature = {name: "*" + TYPES[a.dtype] if isinstance(a, torch.Tensor) else "i32"
                 for name, a in zip(names, args)} | dict.fromkeys(const, "constexpr")
    ptx["code"] = triton.compile(ASTSource(kernel, signature, const), target=GPUTarget("cuda", 90, 32),
                                 options=options).asm["ptx"]

kernel.run = compile_launch
out = {}
for dtype in (torch.float16, torch.bfloat16):
    for pages in (dtype, torch.float8_e4m3fn):
        q, k, v = (torch.randn(4, h, 128, dtype=dtype) for h in (32, 8, 8))
        cos, sin = torch.randn(2, 4, 128, dtype=dtype)
        cache = [torch.zeros(2, 16, 8, 128, dtype=pages) for _ in range(2)]
        triton_fused.rope_write_kv(q, k, v, cos, sin, *cache, torch.arange(4))
        ops = re.findall(r"\b(?:fma|mul|add|sub)(?:\.r[nzmp])?\.(?:f16|bf16|f32)\b", ptx.pop("code"))
        out[f"{TYPES[dtype]} {TYPES[pages]} pages"] = dict(collections.Counter(ops))
print(json.dumps(out))
"""


def test_rope_kernel_rounds_every_product_before_the_sum() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(cases) == 4, cases
    for case, ops in cases.items():
        ty = case.split()[0].replace("fp", "f")  # fp16 -> f16, bf16 stays
        assert not any(op.startswith("fma") for op in ops), f"{case}: a multiply-add skips a rounding: {ops}"
        # The query's and the key's products and sums, each in the model's dtype.
        assert ops.get(f"mul.rn.{ty}", 0) > 0 and ops.get(f"add.rn.{ty}", 0) > 0, f"{case}: {ops}"
        assert ops.get(f"sub.rn.{ty}", 0) > 0, f"{case}: {ops}"
