"""Dataset loaders for bootstrapping and evaluating the length predictor.

Four formats are recognised, by content rather than file name:

- AlpacaEval JSONL (optionally gzip): one object a line with ``id``, ``instruction``,
  ``output`` and ``generator`` (the model that wrote ``output``).
- ShareGPT prompts JSONL (optionally gzip): one object a line with ``id`` and ``prompt``;
  there are no outputs, so its records carry ``output=None``.
- Stanford Alpaca ``alpaca_data.json``: a JSON list of ``{instruction, input, output}``; the
  prompt is the instruction followed by the input when the input is not empty.
- ShareGPT ``ShareGPT_V3_unfiltered_cleaned_split.json``: a JSON list of
  ``{id, conversations: [{from, value}, ...]}``; the first human turn is the prompt and the
  first gpt turn after it the output.

Every loader yields :class:`PromptRecord`. ``prompt_id`` identifies the *prompt*, not the
record: the same AlpacaEval instruction answered by twelve models has one ``prompt_id`` in all
twelve files, which is what lets evaluation split folds by prompt.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("alpaca_eval", "sharegpt_prompts", "alpaca", "sharegpt")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, optionally with the output one model gave it."""

    prompt_id: str
    prompt: str
    output: str | None
    model: str


def _open_text(path: Path):
    with path.open("rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
    if is_gzip:
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def detect_format(path: str | Path) -> str:
    """Returns one of :data:`FORMATS` for ``path``; ``ValueError`` if none fits."""
    path = Path(path)
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
        if head and not head.startswith("["):
            f.seek(0)
            head = next((line for line in f if line.strip()), "")
    if not head:
        raise ValueError(f"{path}: empty file")
    if head.startswith("["):
        if '"conversations"' in head:
            return "sharegpt"
        if '"instruction"' in head:
            return "alpaca"
        raise ValueError(f"{path}: a JSON list, but neither Alpaca nor ShareGPT records")
    try:
        first = json.loads(head)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON Lines ({exc})") from None
    if isinstance(first, dict) and "instruction" in first and "output" in first:
        return "alpaca_eval"
    if isinstance(first, dict) and "prompt" in first:
        return "sharegpt_prompts"
    raise ValueError(f"{path}: unrecognised record with keys {sorted(first)[:8]}")


def _model_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _iter_jsonl(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: bad JSON ({exc})") from None


def _load_alpaca_eval(path: Path) -> Iterator[PromptRecord]:
    fallback = _model_name(path)
    for obj in _iter_jsonl(path):
        prompt_id = str(obj.get("id", obj["instruction"]))
        model = str(obj.get("generator") or fallback)
        yield PromptRecord(f"alpaca_eval:{prompt_id}", obj["instruction"], obj["output"], model)


def _load_sharegpt_prompts(path: Path) -> Iterator[PromptRecord]:
    for obj in _iter_jsonl(path):
        yield PromptRecord(f"sharegpt:{obj['id']}", obj["prompt"], None, "")


def _load_alpaca(path: Path) -> Iterator[PromptRecord]:
    with _open_text(path) as f:
        items = json.load(f)
    model = _model_name(path)
    for i, obj in enumerate(items):
        prompt = obj["instruction"]
        if obj.get("input"):
            prompt = f"{prompt}\n\n{obj['input']}"
        yield PromptRecord(f"alpaca:{i}", prompt, obj.get("output"), model)


def _load_sharegpt(path: Path) -> Iterator[PromptRecord]:
    with _open_text(path) as f:
        items = json.load(f)
    model = _model_name(path)
    for i, obj in enumerate(items):
        prompt = output = None
        for turn in obj.get("conversations", []):
            speaker = turn.get("from")
            if prompt is None and speaker == "human":
                prompt = turn.get("value", "")
            elif prompt is not None and speaker == "gpt":
                output = turn.get("value", "")
                break
        if prompt:
            yield PromptRecord(f"sharegpt:{obj.get('id', i)}", prompt, output, model)


_LOADERS = {
    "alpaca_eval": _load_alpaca_eval,
    "sharegpt_prompts": _load_sharegpt_prompts,
    "alpaca": _load_alpaca,
    "sharegpt": _load_sharegpt,
}


def load_records(path: str | Path, fmt: str | None = None) -> list[PromptRecord]:
    """Loads every record of ``path`` (format auto-detected unless ``fmt`` is given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset not found: {path}")
    fmt = fmt or detect_format(path)
    if fmt not in _LOADERS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    return list(_LOADERS[fmt](path))
