#!/usr/bin/env python3
"""fp8 KV pages on the tiny families: how the scale changes the logits error (CPU).

    python3 bench/fp8_scales.py [--init 0.02 0.1] [--tokens 120]

For each family of tests/familycases.py (a tiny checkpoint with Hugging Face's initializer
range ``--init``), a 8-token prompt then a teacher-forced continuation to ``--tokens`` tokens,
one token a step, through the paged runner on float32 pages (the reference) and with the K/V
rounded to e4m3 on their way into the pages under four scale schemes:

* ``one``: scale 1, what ``kv_cache_dtype="fp8_e4m3"`` stores (the real fp8 runner, not an
  emulation; it equals the emulation of scale 1 exactly);
* ``tensor``: one static scale per (layer, K/V), amax / 448 of the reference run's pages;
* ``head``: one static scale per (layer, K/V, head), likewise;
* ``token``: one scale per (token, head), amax / 448 of that vector (it would need stored scales).

The three calibrated schemes are emulated (values divided by the scale, rounded to e4m3,
multiplied back, then stored in float32 pages). Prints ``||fp8 - ref|| / ||ref||`` over the
continuation's logits, per family and scheme.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from alise.worker.model import attention  # noqa: E402
from alise.worker.model.chunk import SeqChunk  # noqa: E402
from alise.worker.model.kv_cache import to_pages  # noqa: E402
from alise.worker.model.loader import load_model  # noqa: E402
from alise.worker.model.runner import ModelRunner  # noqa: E402
from familycases import CASES  # noqa: E402
from tinymodels import make_tiny_model_dir  # noqa: E402

PROMPT, BLOCK_SIZE = 8, 4
FP8 = torch.float8_e4m3fn


class Rounding:
    """A page write that rounds through e4m3 under one scale scheme (layer = call count mod layers)."""

    def __init__(self, scheme: str, num_layers: int, scales: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.scheme, self.num_layers, self.scales, self.calls = scheme, num_layers, scales, 0

    def round(self, x: torch.Tensor, scale) -> torch.Tensor:
        return to_pages(x / scale, FP8).to(x.dtype) * scale

    def __call__(self, key_cache, value_cache, key, value, slots) -> None:
        layer = self.calls % self.num_layers
        self.calls += 1
        if self.scheme == "token":
            key = self.round(key, key.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 448)
            value = self.round(value, value.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 448)
        else:
            k, v = (s[layer] for s in self.scales)  # [heads]
            if self.scheme == "tensor":
                k, v = k.max(), v.max()
            else:
                k, v = k[:, None], v[:, None]
            key, value = self.round(key, k), self.round(value, v)
        attention.write_kv(key_cache, value_cache, key, value, slots)


def continuation(loaded, ids: list[int], kv_cache_dtype: str = "auto", write=None) -> tuple[torch.Tensor, ModelRunner]:
    table = list(range(-(-len(ids) // BLOCK_SIZE)))
    runner = ModelRunner(loaded, num_blocks=len(table) + 1, block_size=BLOCK_SIZE, max_num_seqs=2, max_num_tokens=16,
                         kv_cache_dtype=kv_cache_dtype)
    if write is not None:
        runner.attention_backend = attention.AttentionBackend("rounding", write, attention.decode_attention)
    rows = [runner.execute([SeqChunk(ids[:PROMPT], 0, table)])]
    rows += [runner.execute([SeqChunk([ids[p]], p, table)]) for p in range(PROMPT, len(ids))]
    return torch.cat(rows), runner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--tokens", type=int, default=120)
    args = parser.parse_args()
    lines = []
    for init in args.init:
        for name in sorted(CASES):
            family, overrides, max_model_len = CASES[name]
            with tempfile.TemporaryDirectory() as tmp:
                loaded = load_model(str(make_tiny_model_dir(Path(tmp), family, initializer_range=init, **overrides)),
                                    max_model_len=max_model_len)
            rng = random.Random(0)
            n = min(args.tokens, loaded.max_model_len)
            ids = [rng.randrange(1000, loaded.config.vocab_size) for _ in range(n)]
            ref, runner = continuation(loaded, ids)
            pages = runner.kv_cache
            scales = tuple(p.abs().amax(dim=(1, 2, 4)) / 448 for p in (pages.key_cache, pages.value_cache))
            errors = {"one": continuation(loaded, ids, "fp8_e4m3")[0]}
            for scheme in ("tensor", "head", "token"):
                errors[scheme] = continuation(loaded, ids, write=Rounding(scheme, pages.shape.num_layers, scales))[0]
            row = {k: ((v - ref).norm() / ref.norm()).item() for k, v in errors.items()}
            cells = " ".join(f"{row[k]:>8.2e}" for k in ("one", "tensor", "head", "token"))
            lines.append(f"{init:>5} {name:<22} {cells}")
            print(lines[-1], flush=True)
    print(f"\nlogits ||fp8 - fp32 pages|| / ||fp32 pages||, {args.tokens - PROMPT}-token continuation")
    print(f"{'init':>5} {'family':<22} {'one':>8} {'tensor':>8} {'head':>8} {'token':>8}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
