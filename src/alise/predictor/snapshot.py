"""Atomic, verified snapshots of the predictor's :class:`History` in a directory.

Layout of ``index_dir``::

    CURRENT                 name of the live snapshot directory (replaced atomically)
    snap-<millis>-<n>/      one complete snapshot:
        manifest.json       format, encoder name, dim, max_seq_length, counts, index type,
                            the first write-ahead log segment it does not cover, sha256 of each file
        vectors.npy         float32 (num_prompts, dim), row-aligned with the index
        index.faiss         the serialized IVF index (empty for a flat one: rebuilt from the vectors)
        prompts.json        stored texts, their keys and prompt token counts, row-aligned
        observations.npz    prompt rows, model ids, output tokens; plus the model names
    wal-<n>.log             write-ahead log segments (``wal.py``)

A snapshot is taken in two parts: :func:`capture` (on the thread that owns the history: a
consistent prefix, views rather than copies) and :func:`write_snapshot` (any thread: files,
fsync, switch). It is written into a temporary directory, every file and the directory are
fsynced, the directory is renamed into place, and only then is ``CURRENT`` replaced (write,
fsync, ``os.replace``). A crash at any point leaves the previous snapshot live; the
temporary directories a crash leaves are removed by :func:`prepare_index_dir` at the next
start. Older snapshots are deleted after the switch.

Loading verifies checksums, counts, encoder name, dim and the encoder's token window.
Anything wrong raises :class:`SnapshotError` naming the file and the problem: a bad index
is a start-up error, never silently replaced by an empty one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alise.predictor.history import History
from alise.predictor.index import VectorIndex

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
CURRENT = "CURRENT"
_FILES = ("vectors.npy", "index.faiss", "prompts.json", "observations.npz")
_SNAP_NAME = re.compile(r"snap-\d+-\d+")
_TMP_PREFIX = ".tmp-snap-"


class SnapshotError(RuntimeError):
    """The index directory cannot be used as it is (corrupt, mismatched, or not ours)."""


@dataclass(frozen=True)
class SnapshotState:
    """A consistent prefix of a history, safe to write from another thread."""

    vectors: np.ndarray
    blob: bytes
    trained_at: int
    index_type: str
    texts: list[str]
    keys: list[str]
    prompt_tokens: np.ndarray
    observations: tuple[np.ndarray, np.ndarray, np.ndarray]
    models: list[str]

    @property
    def num_prompts(self) -> int:
        return len(self.texts)

    @property
    def num_observations(self) -> int:
        return len(self.observations[0])


@dataclass(frozen=True)
class LoadedSnapshot:
    history: History
    #: The first write-ahead log segment this snapshot does not cover.
    wal_segment: int
    path: Path


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


def prepare_index_dir(index_dir: str | Path) -> None:
    """Creates ``index_dir`` if needed, refuses one that cannot be written (at start, not at
    the first snapshot), and removes the temporary directories a crash left."""
    index_dir = Path(index_dir)
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        probe = index_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk is no reason not to serve
            raise SnapshotError(f"--index-dir {index_dir} is not a writable directory "
                                f"({exc.strerror or exc})") from None
    for leftover in index_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def capture(history: History) -> SnapshotState:
    """The history's current prefix. Cheap for a flat index (views, a list copy); an IVF
    index is serialized, which must not overlap an add."""
    vectors, blob, trained_at = history.index.state()
    n, m = history.num_prompts, history.num_observations
    rows, model_ids, tokens = history.observations()
    return SnapshotState(vectors[:n], blob, trained_at, history.index.index_type,
                         history.texts[:n], history.keys[:n], history.prompt_tokens[:n],
                         (rows[:m], model_ids[:m], tokens[:m]), list(history.models))


def _write_files(state: SnapshotState, tmp: Path) -> None:
    np.save(tmp / "vectors.npy", state.vectors)
    (tmp / "index.faiss").write_bytes(state.blob)
    prompts = {"texts": state.texts, "keys": state.keys, "prompt_tokens": state.prompt_tokens.tolist()}
    (tmp / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    rows, model_ids, tokens = state.observations
    np.savez(tmp / "observations.npz", rows=rows, model_ids=model_ids, tokens=tokens,
             trained_at=np.array([state.trained_at]))


def write_snapshot(state: SnapshotState, index_dir: str | Path, encoder_name: str, *,
                   max_seq_length: int | None = None, wal_segment: int = 0) -> Path:
    """Writes a snapshot atomically and makes it current; returns its directory. Blocking."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    name = f"snap-{int(time.time() * 1000)}-{state.num_observations}"
    tmp = index_dir / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(state, tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder": encoder_name,
            "dim": int(state.vectors.shape[1]),
            "max_seq_length": max_seq_length,
            "num_prompts": state.num_prompts,
            "num_observations": state.num_observations,
            "index_type": state.index_type,
            "models": state.models,
            "wal_segment": wal_segment,
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


def save_snapshot(history: History, index_dir: str | Path, encoder_name: str, **kwargs) -> Path:
    """:func:`capture` and :func:`write_snapshot` in one call (same thread)."""
    return write_snapshot(capture(history), index_dir, encoder_name, **kwargs)


def _read_manifest(snap: Path) -> dict:
    path = snap / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in _READABLE_VERSIONS:
        raise SnapshotError(f"{path}: not a predictor manifest of format version "
                            f"{' or '.join(map(str, _READABLE_VERSIONS))}")
    checksums = manifest.get("sha256")
    for f in _FILES:
        expected = checksums.get(f) if isinstance(checksums, dict) else None
        if not (snap / f).is_file():
            raise SnapshotError(f"{snap / f}: missing")
        if expected != _sha256(snap / f):
            raise SnapshotError(f"{snap / f}: checksum mismatch (corrupt snapshot)")
    return manifest


def _current(index_dir: Path) -> Path | None:
    pointer = index_dir / CURRENT
    if not pointer.exists():
        leftovers = [p.name for p in index_dir.iterdir()
                     if not p.name.startswith(".") and not p.name.startswith("wal-")]
        if leftovers:
            raise SnapshotError(
                f"{index_dir}: no {CURRENT} file but not empty ({', '.join(sorted(leftovers)[:5])}); "
                "not a predictor index")
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{pointer}: unreadable ({exc})") from None
    if not _SNAP_NAME.fullmatch(name):
        raise SnapshotError(f"{pointer}: does not name a snapshot ({name[:40]!r})")
    if not (index_dir / name).is_dir():
        raise SnapshotError(f"{pointer}: names {name}, which does not exist")
    return index_dir / name


class EncoderChanged(SnapshotError):
    """The snapshot was made by another encoder with the same window: its stored texts are what
    that encoder saw, so they can be embedded again (``startup.restore_history``)."""

    def __init__(self, message: str, encoder_name: str, dim: int) -> None:
        super().__init__(message)
        self.encoder_name = encoder_name
        self.dim = dim


def _check_encoder(snap: Path, manifest: dict, encoder_name: str, dim: int,
                   max_seq_length: int | None) -> None:
    stored = manifest.get("max_seq_length")
    if stored is not None and max_seq_length is not None and stored != max_seq_length:
        raise SnapshotError(
            f"{snap}: built with --max-seq-length {stored}, but this predictor's encoder sees "
            f"{max_seq_length} tokens; rebuild the index or point --index-dir elsewhere")
    if manifest.get("encoder") != encoder_name or manifest.get("dim") != dim:
        message = (f"{snap}: built with encoder {manifest.get('encoder')!r} (dim {manifest.get('dim')}), "
                   f"but this predictor uses {encoder_name!r} (dim {dim})")
        if isinstance(manifest.get("encoder"), str) and isinstance(manifest.get("dim"), int):
            raise EncoderChanged(message, manifest["encoder"], manifest["dim"])
        raise SnapshotError(message + "; rebuild the index or point --index-dir elsewhere")


def load_snapshot(
    index_dir: str | Path, encoder_name: str, dim: int, *, max_seq_length: int | None = None,
    **index_kwargs,
) -> LoadedSnapshot | None:
    """The current snapshot; ``None`` when ``index_dir`` holds no snapshot yet."""
    index_dir = Path(index_dir)
    if not index_dir.exists():
        return None
    snap = _current(index_dir)
    if snap is None:
        return None
    manifest = _read_manifest(snap)
    _check_encoder(snap, manifest, encoder_name, dim, max_seq_length)
    try:
        vectors = np.load(snap / "vectors.npy", allow_pickle=False)
        obs = np.load(snap / "observations.npz", allow_pickle=False)
        prompts = json.loads((snap / "prompts.json").read_text(encoding="utf-8"))
        index = VectorIndex.from_state(
            vectors, (snap / "index.faiss").read_bytes(), int(obs["trained_at"][0]), **index_kwargs)
        history = History.restore(
            index, prompts["texts"], np.asarray(prompts["prompt_tokens"], np.int32),
            list(manifest["models"]), (obs["rows"], obs["model_ids"], obs["tokens"]),
            keys=prompts.get("keys"))
        wal_segment = int(manifest.get("wal_segment", 0))
    except (ValueError, KeyError, TypeError, OSError, RuntimeError, IndexError) as exc:
        raise SnapshotError(f"{snap}: inconsistent snapshot ({type(exc).__name__}: {exc})") from None
    if history.num_prompts != manifest["num_prompts"]:
        raise SnapshotError(f"{snap}: manifest says {manifest['num_prompts']} prompts, found "
                            f"{history.num_prompts}")
    return LoadedSnapshot(history, wal_segment, snap)
