"""A model's identity as scheduler and workers compare it: its architecture and its weights.

The architecture (``model_fingerprint``): both sides read the same config fields, as written
(a checkpoint directory's config.json, or a preset's row: ``alise.modelinfo.source``; not a
transformers config, whose class fills in defaults, and whose import imports torch), and hash those that decide
what a token id means and what a forward pass computes, so a worker serving another model (a tiny-opt worker
beside a tiny-llama scheduler, say) is refused even when the vocabulary sizes agree.

The weights (``weights_fingerprint``): two checkpoints of one architecture (a base model and
its fine-tune) answer the same prompt differently, so a scheduler must not mix them. For a
directory, both sides hash each safetensors file's header (every tensor's name, dtype, shape
and offsets) and ``SAMPLE_BYTES`` from the middle of each tensor's data: a few KB a file,
read without torch or loading anything. A preset's random weights exist only on the worker
(they depend on its seed, device and dtype): it hashes samples of a few tensors' bytes
(``samples_fingerprint``), and the scheduler holds every later worker to the first one's.

Paths and names may differ between machines (a volume mounted elsewhere) and are not part of
either. No torch here: the scheduler imports this.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelIdentity:
    """What a worker's hello says about the model it serves."""

    name: str
    device: str
    vocab_size: int
    block_bytes: int
    #: ``model_fingerprint`` of the config ("" = not compared).
    model_id: str = ""
    #: ``weights_fingerprint`` of a directory, ``samples_fingerprint`` of random weights ("" = not compared).
    weights: str = ""


#: Config fields that identify an architecture (those a config lacks are skipped).
FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "intermediate_size", "ffn_dim", "word_embed_proj_dim",
          "max_position_embeddings", "do_layer_norm_before", "rope_theta", "tie_word_embeddings")


def model_fingerprint(config: Mapping[str, Any]) -> str:
    """``<model_type>:<12 hex digits>`` of a config's architecture fields, as written."""
    fields = {name: config[name] for name in FIELDS if config.get(name) is not None}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{fields.get('model_type', 'model')}:{digest}"


#: Bytes hashed from the middle of each tensor of a safetensors file, and the most tensors of
#: one file sampled (evenly spread over them by name).
SAMPLE_BYTES = 64
MAX_TENSORS_PER_FILE = 1024
#: A safetensors header longer than this is not one.
MAX_HEADER_BYTES = 100 << 20


def weights_fingerprint(directory: str | Path) -> str:
    """12 hex digits over the ``*.safetensors`` files of ``directory`` ("" when it has none)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return ""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            header = _read_header(f, path)
            digest.update(path.name.encode() + b"\0" + header)
            tensors = sorted((name, t["data_offsets"]) for name, t in json.loads(header).items()
                             if name != "__metadata__")
            step = max(len(tensors) / MAX_TENSORS_PER_FILE, 1.0)
            for i in range(min(len(tensors), MAX_TENSORS_PER_FILE)):
                start, end = tensors[int(i * step)][1]
                f.seek(8 + len(header) + max(start, (start + end - SAMPLE_BYTES) // 2))
                digest.update(f.read(min(SAMPLE_BYTES, end - start)))
    return digest.hexdigest()[:12]


def _read_header(f, path: Path) -> bytes:
    raw = f.read(8)
    (size,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
    if not 0 < size <= MAX_HEADER_BYTES:
        raise ValueError(f"{path} is not a safetensors file (header of {size} bytes)")
    return f.read(size)


def samples_fingerprint(samples: Iterable[tuple[str, bytes]]) -> str:
    """12 hex digits over (tensor name, sampled bytes) pairs, in the order given."""
    digest = hashlib.sha256()
    for name, data in samples:
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:12]
