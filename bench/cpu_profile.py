"""Measures the tiny model's step times on this CPU and writes a latency profile.

    python bench/cpu_profile.py [--model tiny-llama] [--out profiles/tiny-llama-cpu.json]

Uses the real worker engine (model runner over the paged KV cache, sampler), fits the
LatencyModel by non-negative least squares and prints fit error per sample group.
"""

from __future__ import annotations

import argparse
import sys

from alise.tools.sim.profiles import measure_cpu_profile


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--out", default="profiles/tiny-llama-cpu.json")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = measure_cpu_profile(args.model)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(model.to_json() + "\n")
    print(f"{args.model} on {model.meta['device']}: c0 {model.c0_s * 1e3:.3f} ms, "
          f"c_seq {model.c_seq_s * 1e6:.1f} us, c_ctx {model.c_ctx_s * 1e9:.2f} ns/token, "
          f"c_pre {model.c_pre_s * 1e6:.2f} us/token, c_pre2 {model.c_pre2_s * 1e9:.3f} ns/token^2")
    print(f"decode step, batch 1 ctx 64: {model.step_s(1, 64) * 1e3:.2f} ms; batch 8 ctx 8x256: "
          f"{model.step_s(8, 2048) * 1e3:.2f} ms; prefill 256: {model.prefill_s(256) * 1e3:.2f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
