"""The served model as the scheduler sees it: tokenizer, context limit, vocabulary, identity.

Loaded without the weights (and without torch), from the same model argument the workers get
(a checkpoint directory or a preset name), so the scheduler can validate and tokenize requests
before any worker connects, and hold every worker's hello to the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from alise.modelinfo.source import context_limit, resolve_model
from alise.modelinfo.tokenizer import load_tokenizer


@dataclass
class ModelInfo:
    name: str
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    vocab_size: int
    #: ``alise.modelinfo.identity.model_fingerprint`` of the config.
    model_id: str = ""
    #: ``alise.modelinfo.identity.weights_fingerprint`` of a directory's weights ("": a preset, or
    #: a directory without them here; the first worker's is held to then).
    weights_fingerprint: str = ""


def load_model_info(model: str | None, max_model_len: int | None = None) -> ModelInfo:
    source = resolve_model(model)
    limit = context_limit(source.name, source.count("max_position_embeddings"), max_model_len)
    return ModelInfo(source.name, load_tokenizer(source), limit, source.count("vocab_size"),
                     source.model_id, source.weights_fingerprint())
