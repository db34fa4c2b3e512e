#!/usr/bin/env python3
"""fp8 KV pages: how the scale, and the precision itself, set the logits error (CPU).

    python3 bench/fp8_scales.py [--init 0.02 0.1] [--tokens 120] [--prompt 8]
    python3 bench/fp8_scales.py --init 0.05 --hidden 1024 --layers 4 --heads 8 --kv-heads 2 \
        --intermediate 2816 --window 64 --prompt 32 --tokens 96      # the GPU families' shapes

For each family of tests/familycases.py (a checkpoint with Hugging Face's initializer range
``--init``, tiny unless the shape flags say otherwise), a ``--prompt``-token prompt fed one
token a step (so every query reads every key from the pages, in every scheme), then a
teacher-forced continuation to ``--tokens`` tokens, through the paged runner on float32 pages
(the reference) and with the K/V rounded on their way into the pages:

* ``one``: e4m3 with scale 1, what ``kv_cache_dtype="fp8_e4m3"`` stores (the real fp8 runner, not
  an emulation; it equals the emulation of scale 1 exactly);
* ``tensor``: one static scale per (layer, K/V), amax / 448 of the reference run's pages;
* ``head``: one static scale per (layer, K/V, head), likewise;
* ``token``: one scale per (token, head), amax / 448 of that vector (it would need stored scales);
* ``bits3``: the mantissa rounded to 3 bits (nearest even) with no exponent limit: the precision
  of e4m3 without its range, so ``one`` close to ``bits3`` means the range costs nothing;
* ``computed``: the real fp8 runner with the prompt fed as one chunk whose queries attend to its
  own K/V as computed (unrounded), the other semantics a prompt could have (the served one, every
  key as the pages hold it, is ``one``).

The calibrated schemes and ``bits3`` are emulated (values divided by the scale, rounded,
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

BLOCK_SIZE = 4
FP8 = torch.float8_e4m3fn
SCHEMES = ("one", "tensor", "head", "token", "bits3", "computed")


def round_mantissa(x: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """``x`` with its mantissa rounded to ``bits`` bits (nearest even), exponent unbounded."""
    mantissa, exponent = torch.frexp(x)  # mantissa in [0.5, 1)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.tensor(bits + 1))), exponent - bits - 1)


class Rounding:
    """A page write that rounds through e4m3 under one scale scheme (layer = call count mod layers)."""

    def __init__(self, scheme: str, num_layers: int, scales: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.scheme, self.num_layers, self.scales, self.calls = scheme, num_layers, scales, 0

    def round(self, x: torch.Tensor, scale) -> torch.Tensor:
        return to_pages(x / scale, FP8).to(x.dtype) * scale

    def __call__(self, key_cache, value_cache, key, value, slots) -> None:
        layer = self.calls % self.num_layers
        self.calls += 1
        if self.scheme == "bits3":
            key, value = round_mantissa(key), round_mantissa(value)
        elif self.scheme == "token":
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


def continuation(loaded, ids: list[int], prompt: int, kv_cache_dtype: str = "auto", write=None,
                 prompt_chunk: bool = False) -> tuple[torch.Tensor, ModelRunner]:
    table = list(range(-(-len(ids) // BLOCK_SIZE)))
    runner = ModelRunner(loaded, num_blocks=len(table) + 1, block_size=BLOCK_SIZE, max_num_seqs=2,
                         max_num_tokens=max(16, prompt), kv_cache_dtype=kv_cache_dtype)
    if write is not None:
        runner.attention_backend = attention.AttentionBackend("rounding", write, attention.decode_attention)
    if prompt_chunk:
        runner.execute([SeqChunk(ids[:prompt], 0, table)])
    else:
        for p in range(prompt):
            runner.execute([SeqChunk([ids[p]], p, table)])
    rows = [runner.execute([SeqChunk([ids[p]], p, table)]) for p in range(prompt, len(ids))]
    return torch.cat(rows), runner


def as_computed(loaded, ids: list[int], prompt: int) -> torch.Tensor:
    """The fp8 runner with the prompt as one chunk attending to its own K/V unrounded."""
    as_paged = attention.as_paged
    attention.as_paged = lambda x, page_dtype: x
    try:
        return continuation(loaded, ids, prompt, "fp8_e4m3", prompt_chunk=True)[0]
    finally:
        attention.as_paged = as_paged


def shape_overrides(args: argparse.Namespace) -> dict:
    """Config fields of the shape flags (none given: the tiny families as they are)."""
    if args.hidden is None:
        return {}
    fields = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                  intermediate_size=args.intermediate, sliding_window=args.window)
    return {k: v for k, v in fields.items() if v is not None}


def family_row(name: str, init: float, args: argparse.Namespace) -> dict[str, float]:
    family, overrides, max_model_len = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model_dir(Path(tmp), family, initializer_range=init, **(overrides | shape_overrides(args)))
        loaded = load_model(str(path), max_model_len=max_model_len)
    rng = random.Random(0)
    n = min(args.tokens, loaded.max_model_len)
    ids = [rng.randrange(1000, loaded.config.vocab_size) for _ in range(n)]
    ref, runner = continuation(loaded, ids, args.prompt)
    pages = runner.kv_cache
    scales = tuple(p.abs().amax(dim=(1, 2, 4)) / 448 for p in (pages.key_cache, pages.value_cache))
    got = {"one": continuation(loaded, ids, args.prompt, "fp8_e4m3")[0],
           "computed": as_computed(loaded, ids, args.prompt)}
    for scheme in ("tensor", "head", "token", "bits3"):
        write = Rounding(scheme, pages.shape.num_layers, scales)
        got[scheme] = continuation(loaded, ids, args.prompt, write=write)[0]
    return {k: ((v - ref).norm() / ref.norm()).item() for k, v in got.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--families", nargs="+", default=sorted(CASES), choices=sorted(CASES))
    for flag in ("hidden", "layers", "heads", "kv-heads", "intermediate", "window"):
        parser.add_argument(f"--{flag}", type=int, default=None)
    args = parser.parse_args()
    lines = []
    for init in args.init:
        for name in args.families:
            row = family_row(name, init, args)
            lines.append(f"{init:>5} {name:<22} " + " ".join(f"{row[k]:>8.2e}" for k in SCHEMES))
            print(lines[-1], flush=True)
    shape = f"hidden {args.hidden}, {args.layers} layers" if args.hidden else "tiny families"
    print(f"\nlogits ||fp8 - fp32 pages|| / ||fp32 pages||, {shape}, {args.prompt}-token prompt, "
          f"{args.tokens - args.prompt}-token continuation")
    print(f"{'init':>5} {'family':<22} " + " ".join(f"{k:>8}" for k in SCHEMES))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
