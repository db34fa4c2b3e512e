"""The scheduler's view of the served model: tokenizer, context limit, end-of-sequence id.

Loaded without the weights, from the same model argument the workers get (a checkpoint
directory or a preset name), so the scheduler can validate and tokenize requests before
any worker connects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alise.common.model_id import model_fingerprint, weights_fingerprint
from alise.worker import loader
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase


@dataclass
class ModelInfo:
    name: str
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    eos_token_id: int | None
    vocab_size: int
    #: ``alise.common.model_id.model_fingerprint`` of the config.
    model_id: str = ""
    #: ``alise.common.model_id.weights_fingerprint`` of a directory's weights ("": a preset, or
    #: a directory without them here; the first worker's is held to then).
    weights_fingerprint: str = ""


def load_model_info(model: str | None, max_model_len: int | None = None) -> ModelInfo:
    name = loader.DEFAULT_MODEL if model is None else model
    path = Path(name)
    weights = ""
    if path.is_dir():
        weights = weights_fingerprint(path)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos = loader.eos_token_id_of(tokenizer, config)
    elif name in loader.PRESETS:
        tokenizer = loader.minilm_tokenizer()
        config = loader.preset_config(name, tokenizer)
        eos = tokenizer.sep_token_id
    else:
        raise ValueError(f"model {name!r} is neither a local model directory nor a preset; "
                         f"presets: {', '.join(sorted(loader.PRESETS))}")
    limit = config.max_position_embeddings
    if max_model_len is not None:
        if not 0 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}], got {max_model_len}")
        limit = max_model_len
    return ModelInfo(name, tokenizer, limit, eos, config.vocab_size, model_fingerprint(config), weights)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (the tokens of the previous delta plus the unread ones) rather
    than the whole output each time, so word-joining rules see their left context, and
    holds back text that ends in an incomplete character (U+FFFD) until the next token
    completes it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_limit: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_limit = vocab_limit if vocab_limit is not None else len(tokenizer)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        # Random-weight models can emit ids past the tokenizer's vocabulary: they have no text.
        ids = [t for t in ids if 0 <= t < self.vocab_limit]
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta
