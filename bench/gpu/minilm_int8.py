"""The MiniLM encoder's weights in int8 for the trip to the GPU machine, and back to fp32 there.

    python bench/gpu/minilm_int8.py pack SRC/model.safetensors DST/model.safetensors    # here
    python bench/gpu/minilm_int8.py unpack DST/model.safetensors /tmp/minilm/model.safetensors  # there

Each matrix is stored as int8 with one fp16 scale per row (its largest magnitude over 127);
every other tensor in fp16. 22.9 MB in place of 45.4 MB in fp16, which lets the predictor travel
with vLLM's client in one call (bench/gpu/peer_vllm.sh). Unpacked, the weights are fp32, and
the predictor embeds the trace's prompts and its history with the same weights, so its index
and its queries agree. The predictor's tau and MAE on AlpacaEval with the unpacked weights are
the shipped weights' at three decimals (`bench/predictor_layers.py --layers 5 --model-path DIR`,
DIR a copy of the model with its weights packed and unpacked: Kendall tau 0.447 both, p90
coverage 0.896 against 0.898; docs/benchmarks.md).
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file

SCALE = ".int8_scale"


def pack(src: str, dst: str) -> None:
    out = {}
    for name, w in load_file(src).items():
        if w.is_floating_point() and w.dim() == 2:
            w32 = w.float()
            scale = (w32.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127).half()
            out[name] = torch.round(w32 / scale.float()).clamp(-127, 127).to(torch.int8)
            out[name + SCALE] = scale
        else:
            out[name] = w.half() if w.is_floating_point() else w
    save_file(out, dst, metadata={"format": "pt"})


def unpack(src: str, dst: str) -> None:
    packed = load_file(src)
    out = {}
    for name, w in packed.items():
        if name.endswith(SCALE):
            continue
        if name + SCALE in packed:
            out[name] = w.float() * packed[name + SCALE].float()
        else:
            out[name] = w.float() if w.is_floating_point() else w
    save_file(out, dst, metadata={"format": "pt"})


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        raise SystemExit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(sys.argv[2], sys.argv[3])
