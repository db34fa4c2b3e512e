"""load_model: presets build with random weights and say so; directories round-trip; errors are clear."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from alise.modelinfo.presets import MINILM_VOCAB_SIZE, PRESETS
from alise.modelinfo.source import DEFAULT_MODEL
from alise.worker.model.loader import load_model, resolve_dtype
from tinymodels import make_tiny_model_dir

SEP_ID = 102  # [SEP] of the MiniLM WordPiece vocabulary


def test_default_preset_is_random_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="alise.worker.model.loader"):
        loaded = load_model(None)
    assert loaded.name == DEFAULT_MODEL == "tiny-llama"
    assert loaded.random_weights
    assert any("RANDOM weights" in r.getMessage() and "tiny-llama" in r.getMessage() for r in caplog.records)
    assert (loaded.family, loaded.config.vocab_size, loaded.eos_token_id) == ("llama", MINILM_VOCAB_SIZE, SEP_ID)
    assert loaded.config.num_key_value_heads < loaded.config.num_attention_heads  # GQA
    assert (loaded.device, loaded.dtype, loaded.max_model_len) == (torch.device("cpu"), torch.float32, 2048)
    assert not loaded.model.training


def test_preset_seed_fixes_the_weights() -> None:
    first = load_model("tiny-opt", seed=3).model.lm_head.weight
    assert torch.equal(first, load_model("tiny-opt", seed=3).model.lm_head.weight)
    assert not torch.equal(first, load_model("tiny-opt", seed=4).model.lm_head.weight)


@pytest.mark.parametrize(("name", "billions", "dtype"), [
    ("opt-125m", 0.125, "float16"), ("opt-350m", 0.331, "float16"), ("opt-1.3b", 1.316, "float16"),
    ("opt-6.7b", 6.658, "float16"), ("opt-13b", 12.853, "float16"), ("llama-7b", 6.738, "float16"),
    ("llama-13b", 13.016, "float16"), ("llama-3-8b", 8.030, "bfloat16"), ("qwen2.5-1.5b", 1.544, "bfloat16"),
    ("qwen2.5-7b", 7.616, "bfloat16"), ("qwen3-8b", 8.191, "bfloat16"), ("mistral-7b", 7.242, "bfloat16"),
    ("phi-3-mini", 3.821, "bfloat16"), ("gemma-2-9b", 9.242, "bfloat16"), ("gemma-3-1b", 1.000, "bfloat16"),
    ("gemma-3-12b", 11.766, "bfloat16"), ("mixtral-8x7b", 46.703, "bfloat16"), ("qwen3-30b-a3b", 30.532, "bfloat16"),
])
def test_large_presets_have_the_published_sizes(name: str, billions: float, dtype: str) -> None:
    # On the meta device: shapes without memory, so a 47B model "builds" on any machine; "auto"
    # off the CPU is the checkpoint's published dtype. Tied embeddings count once.
    loaded = load_model(name, device="meta")
    num_params = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    assert num_params / 1e9 == pytest.approx(billions, abs=0.001)
    assert loaded.dtype == getattr(torch, dtype) and loaded.random_weights


def test_tiny_presets_serve_on_the_cpu_in_float32() -> None:
    from alise.worker.model.chunk import SeqChunk
    from alise.worker.model.runner import ModelRunner

    for name in [n for n in PRESETS if n.startswith("tiny-")]:
        loaded = load_model(name)
        assert loaded.dtype == torch.float32 and loaded.config.vocab_size == MINILM_VOCAB_SIZE
        logits = ModelRunner(loaded, num_blocks=4, block_size=16).execute([SeqChunk([101, 7592, 2088], 0, [0])])
        assert logits.shape == (1, MINILM_VOCAB_SIZE) and torch.isfinite(logits).all(), name


def test_load_logs_size_and_time(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="alise.worker.model.loader"):
        load_model("tiny-qwen2")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert re.fullmatch(r"loaded tiny-qwen2 \(qwen2, float32, 0\.0\d B parameters, 0\.\d GB\) in \d+\.\d s", line), line


def test_max_model_len_may_lower_but_not_raise_the_limit() -> None:
    assert load_model("tiny-opt", max_model_len=512).max_model_len == 512
    with pytest.raises(ValueError, match=r"max_model_len must be in \[1, 2048\]"):
        load_model("tiny-opt", max_model_len=4096)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_directory_round_trip(tmp_path: Path, family: str) -> None:
    path = make_tiny_model_dir(tmp_path / family, family)
    loaded = load_model(str(path))
    assert (loaded.family, loaded.name, loaded.random_weights) == (family, str(path), False)
    assert loaded.eos_token_id == SEP_ID
    assert loaded.tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    again = load_model(str(make_tiny_model_dir(tmp_path / "again", family)))
    assert torch.equal(loaded.model.lm_head.weight, again.model.lm_head.weight)
    other_seed = load_model(str(make_tiny_model_dir(tmp_path / "other", family, seed=1)))
    assert not torch.equal(loaded.model.lm_head.weight, other_seed.model.lm_head.weight)


def test_unknown_name_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a local model directory nor a preset") as error:
        load_model(str(tmp_path / "no-such-model"))
    assert all(name in str(error.value) for name in PRESETS)


def test_directory_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"lacks config\.json and \*\.safetensors weights"):
        load_model(str(tmp_path))
    path = make_tiny_model_dir(tmp_path / "model")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"lacks \*\.safetensors weights"):
        load_model(str(path))


def test_unsupported_architecture(tmp_path: Path) -> None:
    GPT2Config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: gemma2, gemma3_text, llama, "
                                         "mistral, mixtral, opt, phi3, qwen2, qwen3, qwen3_moe"):
        load_model(str(tmp_path))


def test_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        load_model("tiny-opt", dtype="float8")


def test_sharded_tied_and_bf16_checkpoints_load(tmp_path: Path) -> None:
    sharded = load_model(str(make_tiny_model_dir(tmp_path / "sharded", "qwen2", shard_size="2MB")))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    whole = load_model(str(make_tiny_model_dir(tmp_path / "whole", "qwen2")))
    for (name, a), (_, b) in zip(sharded.model.state_dict().items(), whole.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tied = load_model(str(make_tiny_model_dir(tmp_path / "tied", "qwen2", tie_word_embeddings=True)))
    assert tied.model.lm_head.weight.data_ptr() == tied.model.model.embed_tokens.weight.data_ptr()
    bf16_dir = make_tiny_model_dir(tmp_path / "bf16", "gemma2", dtype=torch.bfloat16)
    assert load_model(str(bf16_dir)).dtype == torch.float32  # the CPU computes in float32
    stored = load_model(str(bf16_dir), dtype="bfloat16")
    assert stored.dtype == torch.bfloat16 and stored.config.dtype == torch.bfloat16


@pytest.mark.parametrize(("declared", "expected"), [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float16),
    (None, torch.float16),
])
def test_auto_dtype_follows_the_checkpoint_off_the_cpu(declared, expected) -> None:
    config = GPT2Config(dtype=declared)
    assert resolve_dtype("auto", torch.device("cuda"), config) == expected
    assert resolve_dtype("auto", torch.device("cpu"), config) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu"), config) == torch.bfloat16


def test_longrope_needs_max_model_len_within_its_original_context(tmp_path: Path) -> None:
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=[4.0] * 8)
    path = make_tiny_model_dir(tmp_path, "phi3", max_position_embeddings=1024, original_max_position_embeddings=64,
                               rope_parameters=rope)
    with pytest.raises(ValueError, match=r"exact up to 64 tokens: pass max_model_len <= 64 \(--max-model-len 64\)"):
        load_model(str(path))
    assert load_model(str(path), max_model_len=64).max_model_len == 64


def test_dynamic_rope_and_multimodal_gemma3_are_refused_before_the_weights(tmp_path: Path) -> None:
    from transformers import Gemma3Config, LlamaConfig

    LlamaConfig(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    with pytest.raises(ValueError, match="rope type 'dynamic' rescales the frequencies by the batch's longest"):
        load_model(str(tmp_path))
    Gemma3Config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Gemma 3 multimodal checkpoints are not served"):
        load_model(str(tmp_path))
