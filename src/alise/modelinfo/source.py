"""The model argument resolved: a local checkpoint directory or a preset, and its config's fields.

One decision for every process that is given ``--model``: a directory (its ``config.json``,
read as written) or a preset name (:data:`alise.modelinfo.presets.PRESETS`), anything else is
refused with the list of presets. No transformers config is built here (building one imports
torch): the fields are plain JSON values, which the scheduler reads and the worker turns into
a config of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alise.modelinfo.identity import model_fingerprint, weights_fingerprint
from alise.modelinfo.presets import PRESETS, preset_fields

#: The model served when none is given: a preset, so nothing needs to be on disk.
DEFAULT_MODEL = "tiny-llama"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``directory`` is None for a preset (random weights)."""

    name: str
    directory: Path | None
    #: The config's fields as written (a preset's: its row, ``model_type`` included).
    fields: dict[str, Any]

    @property
    def is_preset(self) -> bool:
        return self.directory is None

    @property
    def model_id(self) -> str:
        """The architecture's fingerprint (``alise.modelinfo.identity.model_fingerprint``)."""
        return model_fingerprint(self.fields)

    def weights_fingerprint(self) -> str:
        """The directory's weights' fingerprint; "" for a preset (its weights exist only on a worker)."""
        return "" if self.directory is None else weights_fingerprint(self.directory)

    def count(self, field: str) -> int:
        """A positive whole number of the config (``vocab_size``, say); ValueError when it has none."""
        value = self.fields.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model {self.name!r}: its config gives no {field} (got {value!r})")
        return value


def resolve_model(model: str | None) -> ModelSource:
    """``model`` (None: :data:`DEFAULT_MODEL`) as a directory or a preset; ValueError otherwise."""
    name = DEFAULT_MODEL if model is None else model
    path = Path(name)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"model directory {name!r} lacks config.json")
        try:
            fields = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{config} is not a JSON config: {exc}") from None
        return ModelSource(name, path, fields)
    if name in PRESETS:
        return ModelSource(name, None, preset_fields(name))
    raise ValueError(f"model {name!r} is neither a local model directory nor a preset; "
                     f"presets: {', '.join(sorted(PRESETS))}")


def check_model(model: str | None) -> None:
    """ValueError ("model: ...") when ``model`` is given and is neither a directory nor a preset:
    a service's config refuses it before anything starts (None: each finds its default)."""
    if model is not None:
        try:
            resolve_model(model)
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from None


def context_limit(name: str, limit: int | None, max_model_len: int | None) -> int | None:
    """The context limit of model ``name``: the architecture's (``limit``, its config's
    max_position_embeddings), or ``max_model_len`` below it, never above."""
    if max_model_len is not None and not (limit and 0 < max_model_len <= limit):
        raise ValueError(f"max_model_len must be in [1, {limit}] for {name!r}, got {max_model_len}")
    return max_model_len or limit
