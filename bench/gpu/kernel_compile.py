#!/usr/bin/env python3
"""Compiles every Triton kernel of the worker for the H200 (sm_90) ahead of time, on any machine.

No GPU needed: Triton lowers each kernel, at each launch configuration the runner may pick and in
fp16 and bf16, to a sm_90 cubin with its bundled ptxas; its bundled cuobjdump reads the cubin's
registers and stack (local memory: spills), Triton's metadata its shared memory. A kernel that
does not compile, spills, or needs more shared memory than a H200 block may have (227 KiB) is
flagged. Prints one line a kernel, a summary last.

    python bench/gpu/kernel_compile.py [--quick] [--dtype fp16|bf16|both]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from alise.worker.kernels import triton_attention, triton_fused, triton_unified

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DT = {"fp16": "*fp16", "bf16": "*bf16"}
#: fp8 KV pages (kv_cache_dtype fp8_e4m3).
FP8_PTR = "*fp8e4nv"


def unified_cases(dtype: str, quick: bool):
    ptr = DT[dtype]
    types = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, out_ptr=ptr, tables_ptr="*i64", seq_lens_ptr="*i64",
                 query_start_ptr="*i64", scale_log2="fp32", num_seqs="i32", softcap_scale="fp32",
                 softcap_log2="fp32")
    configs = triton_unified.CANDIDATES[:1] if quick else triton_unified.CANDIDATES
    for heads, kv_heads, dim in ((40, 40, 128), (32, 8, 128)):  # OPT-13B, Llama GQA
        group = heads // kv_heads
        for c in configs:
            if c.block_m < group:
                continue
            const = dict(BLOCK_SIZE=16, GROUP=group, BLOCK_Q=c.block_q(group), BLOCK_M=c.block_m, HEAD_DIM=dim,
                         BLOCK_D=dim, BLOCK_N=c.block_n, DOT_F32=False, HAS_WINDOW=False, HAS_SOFTCAP=False)
            yield (f"unified h{heads}/{kv_heads} {c}", triton_unified._unified_kernel, types, const,
                   dict(num_warps=c.num_warps, num_stages=c.num_stages))
    c = triton_unified.CANDIDATES[0]  # Gemma 2's local layers: 256-wide heads, a window, a soft-cap
    const = dict(BLOCK_SIZE=16, GROUP=2, BLOCK_Q=c.block_q(2), BLOCK_M=c.block_m, HEAD_DIM=256, BLOCK_D=256,
                 BLOCK_N=c.block_n, DOT_F32=False, HAS_WINDOW=True, HAS_SOFTCAP=True)
    yield (f"unified h16/8 d256 window softcap {c}", triton_unified._unified_kernel, types, const,
           dict(num_warps=c.num_warps, num_stages=c.num_stages))
    const = dict(BLOCK_SIZE=16, GROUP=1, BLOCK_Q=c.block_q(1), BLOCK_M=c.block_m, HEAD_DIM=128, BLOCK_D=128,
                 BLOCK_N=c.block_n, DOT_F32=False, HAS_WINDOW=False, HAS_SOFTCAP=False)
    yield (f"unified h40/40 fp8 pages {c}", triton_unified._unified_kernel, types | dict(k_ptr=FP8_PTR, v_ptr=FP8_PTR),
           const, dict(num_warps=c.num_warps, num_stages=c.num_stages))


def fused_cases(dtype: str, quick: bool):
    ptr = DT[dtype]
    for rms, cols in ((False, 5120), (True, 4096)):
        types = dict(x_ptr=ptr, delta_ptr=ptr, weight_ptr=ptr, bias_ptr=ptr, sum_ptr=ptr, out_ptr=ptr, eps="fp32",
                     n_cols="i32")
        block = 1 << (cols - 1).bit_length()
        yield (f"add_norm {'rms' if rms else 'ln'} {cols}", triton_fused._add_norm_kernel, types,
               dict(HAS_DELTA=True, HAS_BIAS=not rms, RMS=rms, UNIT_OFFSET=False, BLOCK=block), dict(num_warps=16))
    types = dict(x_ptr=ptr, delta_ptr=ptr, weight_ptr=ptr, bias_ptr=ptr, sum_ptr=ptr, out_ptr=ptr, eps="fp32",
                 n_cols="i32")
    yield ("add_norm gemma-rms 3584", triton_fused._add_norm_kernel, types,
           dict(HAS_DELTA=True, HAS_BIAS=False, RMS=True, UNIT_OFFSET=True, BLOCK=4096), dict(num_warps=8))
    for gelu in (False, True):
        yield (f"act_mul {'gelu_tanh' if gelu else 'silu'}", triton_fused._act_mul_kernel,
               dict(x_ptr=ptr, out_ptr=ptr, n_cols="i32"), dict(GELU_TANH=gelu, BLOCK=1024), dict(num_warps=4))
    types = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, cos_ptr=ptr, sin_ptr=ptr, slots_ptr="*i64", q_out_ptr=ptr,
                 k_cache_ptr=ptr, v_cache_ptr=ptr)
    yield ("rope_write_kv 32/8x128", triton_fused._rope_write_kernel, types,
           dict(NUM_HEADS=32, NUM_KV_HEADS=8, BLOCK_H=32, BLOCK_KV=8, HALF=64, BLOCK_HALF=64, FP8=False),
           triton_fused.ROPE_LAUNCH)
    yield ("rope_write_kv 32/8x128 fp8 pages", triton_fused._rope_write_kernel,
           types | dict(k_cache_ptr=FP8_PTR, v_cache_ptr=FP8_PTR),
           dict(NUM_HEADS=32, NUM_KV_HEADS=8, BLOCK_H=32, BLOCK_KV=8, HALF=64, BLOCK_HALF=64, FP8=True),
           triton_fused.ROPE_LAUNCH)
    configs = triton_fused.SKINNY_CANDIDATES[:1] if quick else triton_fused.SKINNY_CANDIDATES
    types = dict(x_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, out_ptr=ptr, M="i32", N="i32", K="i32")
    if quick:
        configs = (*configs, next(c for c in triton_fused.SKINNY_CANDIDATES if c.vector))
    for c in configs:
        for relu in (False, True):
            yield (f"skinny relu={relu} {c}", triton_fused._skinny_kernel, types,
                   dict(HAS_BIAS=True, RELU=relu, BLOCK_M=1 if c.vector else 16, BLOCK_N=c.block_n,
                        BLOCK_K=c.block_k, DOT_F32=False, VECTOR=c.vector),
                   dict(num_warps=c.num_warps, num_stages=c.num_stages))


def decode_cases(dtype: str, quick: bool):
    ptr = DT[dtype]
    cfg = triton_attention.DECODE_CONFIG
    types = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, tables_ptr="*i64", lens_ptr="*i64", out_ptr=ptr,
                 part_acc_ptr="*fp32", part_ml_ptr="*fp32", scale_log2="fp32", num_heads="i32",
                 softcap_scale="fp32", softcap_log2="fp32")
    types["counters_ptr"] = "*i32"
    for splits in ((1, 8) if quick else (1, 2, 4, 8, 16, 32)):
        for fused in (False, True) if splits > 1 else (False,):
            yield (f"decode splits={splits} fused_merge={fused}", triton_attention._paged_decode_kernel, types,
                   dict(BLOCK_SIZE=16, GROUP=1, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=cfg["block_n"],
                        NUM_SPLITS=splits, USE_DOT=True, FUSED_MERGE=fused, HAS_WINDOW=False, HAS_SOFTCAP=False),
                   dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    yield ("decode d256 window softcap splits=8 fused_merge=True", triton_attention._paged_decode_kernel, types,
           dict(BLOCK_SIZE=16, GROUP=2, BLOCK_G=16, HEAD_DIM=256, BLOCK_D=256,
                BLOCK_N=triton_attention.decode_block_n(256), NUM_SPLITS=8,
                USE_DOT=True, FUSED_MERGE=True, HAS_WINDOW=True, HAS_SOFTCAP=True),
           dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    for splits in (1, 8):  # OPT-13B heads over fp8 pages: batch 64 (no split) and batch 1
        yield (f"decode fp8 pages splits={splits} fused_merge={splits > 1}", triton_attention._paged_decode_kernel,
               types | dict(k_ptr=FP8_PTR, v_ptr=FP8_PTR),
               dict(BLOCK_SIZE=16, GROUP=1, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=cfg["block_n"],
                    NUM_SPLITS=splits, USE_DOT=True, FUSED_MERGE=splits > 1, HAS_WINDOW=False, HAS_SOFTCAP=False),
               dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def compile_one(fn, types: dict, const: dict, options: dict) -> dict:
    """Triton's own sm_90 cubin; its resource usage as cuobjdump reads it."""
    signature = {name: types.get(name, "constexpr" if name in const else "i32") for name in fn.arg_names}
    # As the launcher specializes them at run time: tensors are 16-byte aligned and the strides of
    # the served shapes (head_dim 64/80/128, block tables 128 wide) are multiples of 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name.startswith("stride")}
    kernel = triton.compile(ASTSource(fn, signature, const, attrs), target=TARGET, options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        report = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", report)
    stack = re.search(r"STACK:(\d+)", report)
    local = re.search(r"LOCAL:(\d+)", report)
    return dict(shared=kernel.metadata.shared, regs=int(regs.group(1)) if regs else -1,
                spills=max(int(stack.group(1)) if stack else 0, int(local.group(1)) if local else 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "both"), default="both")
    args = parser.parse_args()
    bad = total = 0
    for dtype in ("fp16", "bf16") if args.dtype == "both" else (args.dtype,):
        for name, fn, types, const, options in [*unified_cases(dtype, args.quick), *fused_cases(dtype, args.quick),
                                                *decode_cases(dtype, args.quick)]:
            total += 1
            start = time.perf_counter()
            try:
                r = compile_one(fn, types, const, options)
            except Exception as exc:  # report every failure, not just the first
                bad += 1
                print(f"FAIL {dtype} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            flag = "" if r["spills"] == 0 and r["shared"] <= MAX_SHARED else "  <-- spills or shared memory"
            bad += bool(flag)
            print(f"ok   {dtype} {name}: {r['regs']} regs, {r['spills']} B stack/local, {r['shared']} B shared, "
                  f"{time.perf_counter() - start:.1f} s{flag}", flush=True)
    print(f"{total - bad}/{total} kernels compiled for sm_90 without spills within shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
