"""The predictor's write-ahead log and snapshot hygiene, on disk, without the encoder."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from alise.predictor.cli import register
from alise.predictor.history import History, prompt_key
from alise.predictor.index import VectorIndex
from alise.predictor.snapshot import SnapshotError, load_snapshot, prepare_index_dir, save_snapshot
from alise.predictor.startup import replay_log
from alise.predictor.wal import LoggedObservation, WriteAheadLog, read_segment, segment_numbers, segment_path

DIM = 8


def observation(i: int, *, vector: bool = True, dedup: str = "") -> LoggedObservation:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    return LoggedObservation(prompt_key(f"prompt {i}"), f"prompt {i}", 3, "m", 10 + i, dedup,
                             v if vector else None)


async def write_log(index_dir, observations, ids=()) -> WriteAheadLog:
    wal = WriteAheadLog(index_dir, first_segment=0, sync_delay_s=0.0)
    wal.open(ids)
    wal.append(observations)
    await wal.sync()
    return wal


async def test_logged_observations_replay_onto_an_empty_history(tmp_path):
    wal = await write_log(tmp_path, [observation(0), observation(1), observation(0, vector=False, dedup="s:3")],
                          ids=["s:1"])
    wal.close()
    history = History(VectorIndex(DIM))
    dedup = replay_log(history, str(tmp_path), 0)
    assert history.num_prompts == 2 and history.num_observations == 3
    assert dedup == ["s:1", "s:3"]
    assert history.observations()[2].tolist() == [10, 11, 10]


async def test_a_torn_last_record_is_ignored_and_a_corrupt_middle_one_is_refused(tmp_path):
    wal = await write_log(tmp_path, [observation(0), observation(1)])
    wal.close()
    path = segment_path(tmp_path, wal.segment)
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # kill -9 in the middle of the last write
    assert sum(1 for r in read_segment(path, DIM) if not isinstance(r, list)) == 1
    corrupt = bytearray(whole)
    corrupt[len(whole) // 2] ^= 0xFF  # inside the first observation: more data follows
    path.write_bytes(bytes(corrupt))
    with pytest.raises(SnapshotError, match=f"{path.name}: corrupt write-ahead log at byte"):
        list(read_segment(path, DIM))


async def test_a_snapshot_covers_the_segments_before_it(tmp_path):
    history = History(VectorIndex(DIM))
    wal = await write_log(tmp_path, [observation(0)])
    replay_log(history, str(tmp_path), 0)
    segment = wal.rotate(["s:9"])
    wal.append([observation(1)])
    await wal.sync()
    save_snapshot(history, tmp_path, "enc", wal_segment=segment)
    wal.delete_before(segment)
    wal.close()
    assert segment_numbers(tmp_path) == [segment]
    loaded = load_snapshot(tmp_path, "enc", DIM)
    assert loaded.wal_segment == segment and loaded.history.num_observations == 1
    assert replay_log(loaded.history, str(tmp_path), loaded.wal_segment) == ["s:9"]
    assert loaded.history.num_observations == 2  # the snapshot's one, then the log's


async def test_concurrent_syncs_share_fsyncs_and_all_return(tmp_path):
    wal = WriteAheadLog(tmp_path, first_segment=0, sync_delay_s=0.01)
    wal.open()

    async def one(i):
        wal.append([observation(i)])
        await wal.sync()

    await asyncio.gather(*(one(i) for i in range(50)))
    wal.close()
    assert sum(1 for r in read_segment(segment_path(tmp_path, wal.segment), DIM)
               if not isinstance(r, list)) == 50


def test_start_removes_crash_leftovers_and_refuses_an_unwritable_dir(tmp_path):
    (tmp_path / ".tmp-snap-123-4-567").mkdir()
    prepare_index_dir(tmp_path)
    assert not list(tmp_path.glob(".tmp-snap-*"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SnapshotError, match="a-file/index is not a writable directory"):
        prepare_index_dir(blocker / "index")


@pytest.mark.parametrize("pointer,message", [
    ("../../etc", "CURRENT: does not name a snapshot"),
    ("snap-1-2", "CURRENT: names snap-1-2, which does not exist"),
    (b"\xff\xfe", "CURRENT: unreadable"),
])
def test_a_bad_current_pointer_is_named(tmp_path, pointer, message):
    save_snapshot(History(VectorIndex(DIM)), tmp_path, "enc")
    target = tmp_path / "CURRENT"
    target.write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    with pytest.raises(SnapshotError, match=message):
        load_snapshot(tmp_path, "enc", DIM)


def test_a_changed_token_window_is_refused_like_a_changed_encoder(tmp_path):
    save_snapshot(History(VectorIndex(DIM)), tmp_path, "enc", max_seq_length=256)
    assert load_snapshot(tmp_path, "enc", DIM, max_seq_length=256) is not None
    with pytest.raises(SnapshotError, match="--max-seq-length 256.*sees 128 tokens"):
        load_snapshot(tmp_path, "enc", DIM, max_seq_length=128)


def test_a_manifest_that_is_not_an_object_is_a_snapshot_error(tmp_path):
    snap = save_snapshot(History(VectorIndex(DIM)), tmp_path, "enc")
    (snap / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(SnapshotError, match="manifest.json: not a predictor manifest"):
        load_snapshot(tmp_path, "enc", DIM)


def test_predictor_serve_takes_no_api_tokens():
    import argparse

    parser = argparse.ArgumentParser(prog="alise")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["predictor", "serve", "--snapshot-interval-s", "5"])
    assert args.snapshot_interval_s == 5 and not hasattr(args, "api_token_file")
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["predictor", "serve", "--api-token-file", "tokens.txt"])
    assert info.value.code == 2


async def test_a_write_the_disk_cannot_take_leaves_no_half_record(tmp_path, file_size_limit):
    wal = await write_log(tmp_path, [observation(0)])
    path = segment_path(tmp_path, wal.segment)
    size = path.stat().st_size
    file_size_limit(size + 40)  # room for part of the next record only
    with pytest.raises(OSError):
        wal.append([observation(1), observation(2)])
    file_size_limit(size + (1 << 20))
    assert path.stat().st_size == size
    wal.append([observation(3)])
    await wal.sync()
    wal.close()
    # The log replays whole: what was refused is absent, what came after it is there.
    history = History(VectorIndex(DIM))
    replay_log(history, str(tmp_path), 0)
    assert history.observations()[2].tolist() == [10, 13]


async def test_a_sync_waiting_while_a_rotation_cannot_start_the_next_segment_returns(tmp_path, file_size_limit):
    wal = await write_log(tmp_path, [observation(0)])
    wal.sync_delay_s = 0.05
    wal.append([observation(1)])
    pending = asyncio.ensure_future(wal.sync())
    await asyncio.sleep(0)  # its fsync waits for later appends to join it
    file_size_limit(1)  # the next segment cannot take its first record
    with pytest.raises(OSError):
        wal.rotate([])
    file_size_limit(1 << 30)
    await asyncio.wait_for(pending, 5)  # the rotation made the appends durable
    assert not wal.is_open
    history = History(VectorIndex(DIM))
    replay_log(history, str(tmp_path), 0)
    assert history.observations()[2].tolist() == [10, 11]
