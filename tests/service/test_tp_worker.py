"""`alise worker --tensor-parallel-size 2` as a real process (gloo on the CPU: it and the rank it
starts) serving a scheduler in this process, through the SDK.

One scenario, as starting the ranks costs seconds: the TP worker says hello with the replica's
capacity and its rank count (which the scheduler's status and `alise status` show) and serves
greedy tokens; then, with streams running on it, its rank 1 is killed: the
worker exits at once with EXIT_RANK_DIED, the scheduler requeues its jobs, and a one-device
worker that joins finishes them, each stream whole, without a gap, and serves the first prompt's
tokens again (TP=2 and one device compute the same greedy tokens).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster_fixtures import cluster

from alise.worker.tp_ranks import EXIT_RANK_DIED

NUM_BLOCKS = 64
PROMPT = "tensor parallel"


def start_tp_worker(worker_address: str, model: str, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "alise.cli.main", "worker", "--scheduler", worker_address, "--model", model,
         "--tensor-parallel-size", "2", "--num-device-blocks", str(NUM_BLOCKS), "--block-size", "4",
         "--worker-id", "tp", "--health-address", "", "--max-num-seqs", "8"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def spawned_children(pid: int) -> list[int]:
    """Processes that ``pid`` started with multiprocessing's spawn (its ranks; not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


async def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


MAX_TOKENS = 200  # prompt and output within the tiny model's 256 positions


async def stream(client, i: int, chunks: list) -> list:
    async for chunk in client.generate(f"stream {i}", max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0):
        chunks.append(chunk)
    return chunks


def test_tp2_worker_serves_and_a_dead_rank_takes_it_down(tiny_llama_dir, tmp_path) -> None:
    asyncio.run(scenario(str(tiny_llama_dir), tmp_path))


async def scenario(model: str, tmp_path) -> None:
    async with cluster(model, num_workers=0) as c, c.client() as client:
        with open(tmp_path / "worker.log", "w") as log:
            proc = start_tp_worker(c.worker_address, model, log)
            try:
                await wait_for(lambda: _has_workers(client, 1), 120, "the TP worker never said hello")
                [hello] = (await client.status()).workers
                assert (hello["worker_id"], hello["num_device_blocks"], hello["tensor_parallel_size"]) == (
                    "tp", NUM_BLOCKS, 2)
                status_cmd = [sys.executable, "-m", "alise.cli.main", "status", "--address", c.address]
                shown = await asyncio.to_thread(subprocess.run, status_cmd, capture_output=True, text=True)
                assert "worker tp: " in shown.stdout and " on cpu (TP 2)  device blocks" in shown.stdout, shown
                tp_tokens = (await client.complete(PROMPT, max_tokens=12, ignore_eos=True, temperature=0)).token_ids

                seen = [[] for _ in range(3)]
                streams = [asyncio.create_task(stream(client, i, chunks)) for i, chunks in enumerate(seen)]

                async def flowing() -> bool:
                    return all(len(chunks) >= 3 for chunks in seen)

                await wait_for(flowing, 30, "the streams never started")
                [rank1] = spawned_children(proc.pid)
                os.kill(rank1, signal.SIGKILL)
                started = time.monotonic()
                assert await asyncio.to_thread(proc.wait, 30) == EXIT_RANK_DIED
                assert time.monotonic() - started < 10
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert not all(s.done() for s in streams)  # the worker died mid-stream
        await c.add_worker(model, num_device_blocks=NUM_BLOCKS, block_size=4, max_num_seqs=8)
        results = await asyncio.wait_for(asyncio.gather(*streams), 120)
        for chunks in results:
            assert sum(len(ch.token_ids) for ch in chunks) == MAX_TOKENS
            assert [ch.index for ch in chunks] == [sum(len(x.token_ids) for x in chunks[:i])
                                                   for i in range(len(chunks))]
        one_device = (await client.complete(PROMPT, max_tokens=12, ignore_eos=True, temperature=0)).token_ids
        assert tp_tokens == one_device
        assert [w["tensor_parallel_size"] for w in (await client.status()).workers] == [1]


async def _has_workers(client, n: int) -> bool:
    return len((await client.status()).workers) == n
