"""Atomic, verified snapshots of the predictor's :class:`History` in a directory.

Layout of ``index_dir``::

    CURRENT                 name of the live snapshot directory (replaced atomically)
    snap-<millis>-<n>/      one complete snapshot:
        manifest.json       format, encoder name, dim, counts, index type, sha256 of each file
        vectors.npy         float32 (num_prompts, dim), row-aligned with the index
        index.faiss         the serialized faiss index (so IVF is not retrained on start)
        prompts.json        texts and prompt token counts, row-aligned
        observations.npz    prompt rows, model ids, output tokens; plus the model names

A snapshot is written into a temporary directory, every file and the directory are fsynced,
the directory is renamed into place, and only then is ``CURRENT`` replaced (write, fsync,
``os.replace``). A crash at any point leaves the previous snapshot live. Older snapshots are
deleted after the switch.

Loading verifies checksums, counts, encoder name and dim. Anything wrong raises
:class:`SnapshotError` naming the problem: a bad index is a start-up error, never silently
replaced by an empty one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from alise.predictor.history import History
from alise.predictor.index import VectorIndex

FORMAT_VERSION = 1
CURRENT = "CURRENT"
_FILES = ("vectors.npy", "index.faiss", "prompts.json", "observations.npz")


class SnapshotError(RuntimeError):
    """The index directory cannot be used as it is (corrupt, mismatched, or not ours)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(history: History, tmp: Path) -> None:
    vectors, blob, trained_at = history.index.state()
    np.save(tmp / "vectors.npy", vectors)
    (tmp / "index.faiss").write_bytes(blob)
    prompts = {"texts": history.texts, "prompt_tokens": history.prompt_tokens.tolist()}
    (tmp / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    rows, model_ids, tokens = history.observations()
    np.savez(tmp / "observations.npz", rows=rows, model_ids=model_ids, tokens=tokens,
             trained_at=np.array([trained_at]))


def save_snapshot(history: History, index_dir: str | Path, encoder_name: str) -> Path:
    """Writes a snapshot atomically and makes it current; returns its directory."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    name = f"snap-{int(time.time() * 1000)}-{history.num_observations}"
    tmp = index_dir / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(history, tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder": encoder_name,
            "dim": history.dim,
            "num_prompts": history.num_prompts,
            "num_observations": history.num_observations,
            "index_type": history.index.index_type,
            "models": history.models,
            "created_at": time.time(),
            "sha256": {f: _sha256(tmp / f) for f in _FILES},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for f in (*_FILES, "manifest.json"):
            _fsync_path(tmp / f)
        _fsync_path(tmp)
        final = index_dir / name
        os.rename(tmp, final)
        pointer = index_dir / f".{CURRENT}.tmp"
        with pointer.open("w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, index_dir / CURRENT)
        _fsync_path(index_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in index_dir.glob("snap-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _read_manifest(snap: Path) -> dict:
    try:
        manifest = json.loads((snap / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{snap}: unreadable manifest.json ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{snap}: manifest is not format version {FORMAT_VERSION}")
    for f in _FILES:
        expected = manifest.get("sha256", {}).get(f)
        if not (snap / f).is_file():
            raise SnapshotError(f"{snap}: missing {f}")
        if expected != _sha256(snap / f):
            raise SnapshotError(f"{snap}: checksum mismatch for {f} (corrupt snapshot)")
    return manifest


def load_snapshot(
    index_dir: str | Path, encoder_name: str, dim: int, **index_kwargs
) -> History | None:
    """The current snapshot's history; ``None`` when ``index_dir`` holds no index yet."""
    index_dir = Path(index_dir)
    if not index_dir.exists():
        return None
    pointer = index_dir / CURRENT
    if not pointer.exists():
        leftovers = [p.name for p in index_dir.iterdir() if not p.name.startswith(".tmp-")]
        if leftovers:
            raise SnapshotError(
                f"{index_dir}: no {CURRENT} file but not empty ({', '.join(sorted(leftovers)[:5])}); "
                "not a predictor index"
            )
        return None
    snap = index_dir / pointer.read_text().strip()
    manifest = _read_manifest(snap)
    if manifest.get("encoder") != encoder_name or manifest.get("dim") != dim:
        raise SnapshotError(
            f"{snap}: built with encoder {manifest.get('encoder')!r} (dim {manifest.get('dim')}), "
            f"but this predictor uses {encoder_name!r} (dim {dim}); rebuild the index or point "
            "--index-dir elsewhere"
        )
    try:
        vectors = np.load(snap / "vectors.npy")
        obs = np.load(snap / "observations.npz")
        prompts = json.loads((snap / "prompts.json").read_text(encoding="utf-8"))
        index = VectorIndex.from_state(
            vectors, (snap / "index.faiss").read_bytes(), int(obs["trained_at"][0]), **index_kwargs
        )
        history = History.restore(
            index,
            prompts["texts"],
            np.asarray(prompts["prompt_tokens"], np.int32),
            list(manifest["models"]),
            (obs["rows"], obs["model_ids"], obs["tokens"]),
        )
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise SnapshotError(f"{snap}: inconsistent snapshot ({exc})") from None
    if history.num_prompts != manifest["num_prompts"]:
        raise SnapshotError(f"{snap}: manifest says {manifest['num_prompts']} prompts, found "
                            f"{history.num_prompts}")
    return history
