"""The write-ahead log: observations appended between snapshots, fsync'd in batches.

Layout (beside the snapshots in ``index_dir``): segments ``wal-<n>.log``, numbered upward. A
snapshot records the first segment it does *not* cover (``wal_segment`` in its manifest);
loading replays the segments from there on, in order, and the snapshot after that deletes
what it covers. The predictor writes into one segment at a time and starts a new one when a
snapshot begins, so a snapshot covers exactly the segments before the current one.

A record is ``<u32 payload length><u32 crc32 of payload><payload>``; the payload is one kind
byte then its body:

- ``O`` an observation: ``<u32 n>`` + n bytes of JSON (key, stored text, prompt tokens, model,
  output tokens, de-duplication id) + the prompt's float32 vector when the prompt was new to
  the history (``dim`` floats), nothing when it was already stored;
- ``I`` the de-duplication ids of recent observations (JSON list), first in each segment, so a
  sender's resend after a lost answer counts once across a snapshot too.

Appends go to the file at once (one ``write``), whole or not at all (a disk that fills up
mid-record gets it cut off again; a segment the disk could not start is started again by the
next append); :meth:`WriteAheadLog.sync` makes them durable
with one ``fsync`` for every caller that waited in the same ``sync_delay_s`` window, in a
worker thread. An answer to the sender is sent only after its sync.

A ``kill -9`` can leave the last record half written: replay stops there (logged). A bad
record with more data after it is corruption, and raises :class:`SnapshotError` naming the
file and offset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alise.predictor.snapshot import SnapshotError

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
_PREFIX = "wal-"
_SUFFIX = ".log"
#: Largest payload a record may claim (a stored text is at most a few kB); more is corruption.
_MAX_PAYLOAD = 16 << 20


@dataclass(frozen=True)
class LoggedObservation:
    """One observation as the history takes it (``vector`` only for a prompt new to it)."""

    key: str
    text: str
    prompt_tokens: int
    model: str
    output_tokens: int
    dedup_id: str = ""
    vector: np.ndarray | None = None


def segment_path(index_dir: Path, number: int) -> Path:
    return index_dir / f"{_PREFIX}{number:08d}{_SUFFIX}"


def segment_numbers(index_dir: str | Path) -> list[int]:
    """Numbers of the segments in ``index_dir``, ascending."""
    out = []
    for path in Path(index_dir).glob(f"{_PREFIX}*{_SUFFIX}"):
        digits = path.name[len(_PREFIX):-len(_SUFFIX)]
        if digits.isdigit():
            out.append(int(digits))
    return sorted(out)


def delete_segments_before(index_dir: str | Path, number: int) -> None:
    """Removes the segments a snapshot covers (those numbered below ``number``)."""
    for n in segment_numbers(index_dir):
        if n < number:
            segment_path(Path(index_dir), n).unlink(missing_ok=True)


def _record(kind: bytes, body: bytes) -> bytes:
    payload = kind + body
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def encode_observation(obs: LoggedObservation) -> bytes:
    meta = json.dumps([obs.key, obs.text, obs.prompt_tokens, obs.model, obs.output_tokens,
                       obs.dedup_id], ensure_ascii=False).encode("utf-8", "surrogatepass")
    vector = b"" if obs.vector is None else np.asarray(obs.vector, "<f4").tobytes()
    return _record(b"O", struct.pack("<I", len(meta)) + meta + vector)


def _decode(payload: bytes, dim: int) -> LoggedObservation | list[str]:
    kind, body = payload[:1], payload[1:]
    if kind == b"I":
        ids = json.loads(body.decode("utf-8"))
        if not isinstance(ids, list):
            raise ValueError("id record is not a list")
        return [str(i) for i in ids]
    if kind != b"O":
        raise ValueError(f"unknown record kind {kind!r}")
    (n,) = struct.unpack_from("<I", body)
    key, text, prompt_tokens, model, output_tokens, dedup_id = json.loads(
        body[4:4 + n].decode("utf-8", "surrogatepass"))
    rest = body[4 + n:]
    if len(rest) not in (0, 4 * dim):
        raise ValueError(f"vector of {len(rest)} bytes, expected 0 or {4 * dim}")
    vector = np.frombuffer(rest, "<f4").astype(np.float32) if rest else None
    return LoggedObservation(str(key), str(text), int(prompt_tokens), str(model), int(output_tokens),
                             str(dedup_id), vector)


def read_segment(path: Path, dim: int) -> Iterator[LoggedObservation | list[str]]:
    """The records of one segment; stops at a torn last record, raises on corruption."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: unreadable write-ahead log ({exc})") from None
    offset = 0
    while offset < len(data):
        torn = f"{path}: last record at byte {offset} is incomplete (a crash mid-write); ignored"
        if offset + _HEADER.size > len(data):
            logger.warning(torn)
            return
        length, crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if length > _MAX_PAYLOAD or end > len(data):
            if length <= _MAX_PAYLOAD:
                logger.warning(torn)
                return
            raise SnapshotError(f"{path}: corrupt write-ahead log at byte {offset} "
                                f"(record claims {length} bytes)")
        payload = data[offset + _HEADER.size:end]
        if zlib.crc32(payload) != crc:
            if end == len(data):
                logger.warning(torn)
                return
            raise SnapshotError(f"{path}: corrupt write-ahead log at byte {offset} (checksum mismatch)")
        try:
            yield _decode(payload, dim)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
            raise SnapshotError(f"{path}: bad write-ahead log record at byte {offset} ({exc})") from None
        offset = end


def replay(index_dir: str | Path, first_segment: int, dim: int
           ) -> Iterator[LoggedObservation | list[str]]:
    """Every record of the segments numbered ``first_segment`` and up, in order."""
    for number in segment_numbers(index_dir):
        if number >= first_segment:
            yield from read_segment(segment_path(Path(index_dir), number), dim)


class WriteAheadLog:
    """Appends to the current segment; batched fsync; rotation at snapshots. Loop-only use."""

    def __init__(self, index_dir: str | Path, *, first_segment: int, sync_delay_s: float = 0.01) -> None:
        self.index_dir = Path(index_dir)
        self.sync_delay_s = sync_delay_s
        self.segment = max([first_segment, *[n + 1 for n in segment_numbers(self.index_dir)]])
        self._file = None
        self._written = self._synced = 0  # bytes over all segments, both only grow
        self._sync_task: asyncio.Task | None = None
        self.num_logged = 0
        #: The ids the current segment starts with (again, if starting it failed).
        self._carried: list[str] = []

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self, carried_ids: Sequence[str] = ()) -> None:
        """Starts the current segment (with the recent de-duplication ids first). When the disk
        cannot take it (OSError, raised), the log stays closed and the next append starts the
        segment again, ids first."""
        self._carried = list(carried_ids)
        self._file = open(segment_path(self.index_dir, self.segment), "ab", buffering=0)
        try:
            self._write(_record(b"I", json.dumps(self._carried).encode("utf-8")))
            self._fsync_now()
        except OSError:
            self._file.close()
            self._file = None
            raise

    def _write(self, data: bytes) -> None:
        """Appends ``data`` whole or not at all: what a full disk took of it is cut off again
        (then OSError), so a segment never holds half a record with more records after it."""
        size = os.fstat(self._file.fileno()).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view):]  # a short write when the disk fills up
        except OSError:
            self._file.truncate(size)
            raise
        self._written += len(data)

    def append(self, observations: Sequence[LoggedObservation]) -> None:
        """Writes the records (not yet durable: await :meth:`sync`)."""
        if observations:
            if self._file is None:
                self.open(self._carried)
            self._write(b"".join(encode_observation(o) for o in observations))
            self.num_logged += len(observations)

    async def sync(self) -> None:
        """Returns once everything appended before the call is on disk."""
        target = self._written
        while self._synced < target:
            if self._sync_task is None or self._sync_task.done():
                self._sync_task = asyncio.ensure_future(self._sync_batch())
            await asyncio.shield(self._sync_task)

    async def _sync_batch(self) -> None:
        await asyncio.sleep(self.sync_delay_s)  # later appends join this fsync
        upto = self._written
        if self._file is None:  # a rotation synced the segment, closed it and could not start the next
            self._synced = max(self._synced, upto)
            return
        fd = os.dup(self._file.fileno())  # stays valid if a rotation closes the file meanwhile
        try:
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        self._synced = max(self._synced, upto)

    def _fsync_now(self) -> None:
        os.fsync(self._file.fileno())
        self._synced = self._written

    def rotate(self, carried_ids: Sequence[str]) -> int:
        """Closes the current segment durably and starts the next; returns the new number
        (a snapshot taken now covers every segment below it)."""
        if self._file is not None:
            self._fsync_now()
            self._file.close()
        self.segment += 1
        self.num_logged = 0
        self.open(carried_ids)
        return self.segment

    def delete_before(self, number: int) -> None:
        delete_segments_before(self.index_dir, number)

    def close(self) -> None:
        if self._file is not None:
            self._fsync_now()
            self._file.close()
            self._file = None
