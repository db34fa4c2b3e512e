"""load_model: presets build with random weights and say so; directories round-trip; errors are clear."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from alise.worker.loader import DEFAULT_MODEL, MINILM_VOCAB_SIZE, PRESETS, load_model
from tinymodels import make_tiny_model_dir
from transformers import GPT2Config

SEP_ID = 102  # [SEP] of the MiniLM WordPiece vocabulary


def test_default_preset_is_random_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="alise.worker.loader"):
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


@pytest.mark.parametrize(("name", "billions"), [
    ("opt-125m", 0.125), ("opt-350m", 0.331), ("opt-1.3b", 1.316), ("opt-6.7b", 6.658), ("opt-13b", 12.853),
    ("llama-7b", 6.738), ("llama-13b", 13.016),
])
def test_large_presets_have_the_published_sizes(name: str, billions: float) -> None:
    # On the meta device: shapes without memory, so a 13B model "builds" on any machine.
    loaded = load_model(name, device="meta")
    num_params = sum(p.numel() for p in loaded.model.parameters())
    assert num_params / 1e9 == pytest.approx(billions, abs=0.001)
    assert loaded.dtype == torch.float16 and loaded.random_weights


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
