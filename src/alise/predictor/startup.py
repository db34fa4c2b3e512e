"""Filling a history at start-up: from dataset files (a cold start) and from the write-ahead
log (the observations since the last snapshot). Blocking; callers run these in a thread."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from alise.predictor.datasets import load_records
from alise.predictor.history import History, prompt_key
from alise.predictor.index import VectorIndex
from alise.predictor.snapshot import EncoderChanged, SnapshotError, load_snapshot
from alise.predictor.wal import LoggedObservation, replay, segment_numbers

logger = logging.getLogger(__name__)


def bootstrap_history(history: History, encoder, paths, tokenizer_path) -> int:
    """Adds every record with an output from ``paths`` (blocking); returns how many."""
    from alise.predictor.tokens import TokenCounter

    records = [r for p in paths for r in load_records(p) if r.output is not None]
    if not records:
        return 0
    texts = list(dict.fromkeys(r.prompt for r in records))
    encoded = encoder.encode(texts)
    keys = [prompt_key(t) for t in texts]
    stored = [t[:n] for t, n in zip(texts, encoded.visible_chars, strict=True)]
    rows = history.add_prompts(stored, encoded.vectors, encoded.num_tokens, keys)
    row_of = dict(zip(texts, rows.tolist(), strict=True))
    tokens = TokenCounter(tokenizer_path).count([r.output for r in records])
    history.add_observations(np.array([row_of[r.prompt] for r in records]),
                             [r.model for r in records], tokens)
    return len(records)


def add_logged(history: History, logged: list[LoggedObservation]) -> None:
    if not logged:
        return
    dim = history.dim
    vectors = np.stack([o.vector if o.vector is not None else np.zeros(dim, np.float32) for o in logged])
    rows = history.add_prompts([o.text for o in logged], vectors, [o.prompt_tokens for o in logged],
                               [o.key for o in logged])
    history.add_observations(rows, [o.model for o in logged], [o.output_tokens for o in logged])


def replay_log(history: History, index_dir: str, first_segment: int) -> list[str]:
    """Applies the log's observations on top of a loaded snapshot; returns the recent
    de-duplication ids. Blocking."""
    dedup: list[str] = []
    batch: list[LoggedObservation] = []
    new_keys: set[str] = set()
    for record in replay(index_dir, first_segment, history.dim):
        if isinstance(record, list):
            dedup += record
            continue
        if record.vector is not None:
            new_keys.add(record.key)
        elif history.row_of_key(record.key) is None and record.key not in new_keys:
            raise SnapshotError(f"{index_dir}: the write-ahead log has an observation of a prompt "
                                "that neither the snapshot nor the log holds (wrong snapshot?)")
        batch.append(record)
        if record.dedup_id:
            dedup.append(record.dedup_id)
    add_logged(history, batch)
    if batch:
        logger.info("replayed %d logged observations", len(batch))
    return dedup


class Restored(NamedTuple):
    """A history restored from an index dir (see :func:`restore_history`)."""

    history: History
    #: The first write-ahead log segment the history does not cover.
    first_segment: int
    #: The recent de-duplication ids the log carried.
    dedup: list[str]
    #: Another encoder made the snapshot: its prompts were embedded again (snapshot it now).
    reembedded: bool


def restore_history(index_dir: str, encoder, **index_kwargs) -> Restored | None:
    """The current snapshot's history with the write-ahead log replayed on it; None when the
    directory holds no snapshot yet. Blocking.

    A snapshot another encoder made with the same window is embedded again by ``encoder``: the
    stored texts are what the old encoder saw of each prompt, so the new vectors are the ones
    the new encoder gives the prompts, and the prompts' token counts, keys and every
    observation are kept. The caller snapshots such a history before taking new observations,
    so the old vectors' log segments are then dropped."""
    changed = None
    try:
        loaded = load_snapshot(index_dir, encoder.name, encoder.dim,
                               max_seq_length=encoder.max_seq_length, **index_kwargs)
    except EncoderChanged as exc:  # loaded with its own encoder's name and dim, then remade
        changed = exc
        loaded = load_snapshot(index_dir, exc.encoder_name, exc.dim,
                               max_seq_length=encoder.max_seq_length, **index_kwargs)
    if loaded is None:
        return None
    old = loaded.history
    dedup = replay_log(old, index_dir, loaded.wal_segment)
    if changed is None:
        return Restored(old, loaded.wal_segment, dedup, False)
    logger.warning("%s was made by encoder %s; embedding its %d prompts again with %s",
                   loaded.path, changed.encoder_name, old.num_prompts, encoder.name)
    history = History(VectorIndex(encoder.dim, **index_kwargs))
    history.add_prompts(old.texts, encoder.encode(old.texts).vectors, old.prompt_tokens, old.keys)
    rows, model_ids, tokens = old.observations()
    history.add_observations(rows, [old.models[m] for m in model_ids], tokens)
    first = max([loaded.wal_segment - 1, *segment_numbers(index_dir)]) + 1  # all were replayed
    return Restored(history, first, dedup, True)
