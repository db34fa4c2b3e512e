"""Prefix caching on the worker: a second request with a cached prefix computes only its
uncached tokens, with the same logits as without the cache (a real tiny model on the CPU), and
random admit / share / pause / resume / abort / finish operations never leak a block nor write
into, move or free a block another sequence reads."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alise.core.blocks import blocks_for, place_blocks
from alise.core.commands import Admit, KvAction, Pause, Resume, StepPlan
from alise.core.job import KvPlace
from alise.core.latency_model import LatencyModel
from alise.core.prefix_cache import chain_hashes
from alise.core.sampling import SamplingParams
from alise.tools.sim.virtual_worker import virtual_worker
from alise.worker.engine import WorkerEngine
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from tinymodels import make_tiny_model_dir

BS = 8
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp("prefix-llama"), "llama")), device="cpu")


def model_engine(loaded, *, prefix_caching: bool) -> WorkerEngine:
    runner = ModelRunner(loaded, num_blocks=32, block_size=BS)
    engine = make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len,
                                prefix_caching=prefix_caching)
    engine.runner = runner
    return engine


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_to_end(engine: WorkerEngine, job_id: str) -> tuple[list[int], list[torch.Tensor], list[tuple[int, int]]]:
    """Steps until the job ends: (its tokens, its logits rows, the (start, tokens) of its feeds)."""
    rows: list[torch.Tensor] = []
    feeds: list[tuple[int, int]] = []
    execute = engine.runner.execute

    def recording(chunks, **kwargs):
        logits = execute(chunks, **kwargs)
        for chunk, row in zip(chunks, logits, strict=True):
            rows.append(row.clone())
            feeds.append((chunk.start_pos, len(chunk.token_ids)))
        return logits

    engine.runner.execute = recording
    seq = engine.seqs[job_id]
    while job_id in engine.seqs:
        engine.step(StepPlan(0, run_step=True, chunks={job_id: seq.num_tokens - seq.num_cached}))
    engine.runner.execute = execute
    return seq.token_ids, rows, feeds


def test_a_cached_prefix_is_not_computed_again_and_changes_no_logit(loaded):
    system = tokens(3 * BS + 5, seed=1)  # three full blocks and a partial one
    first, second = system + tokens(7, seed=2), system + tokens(11, seed=3)

    ref = model_engine(loaded, prefix_caching=False)
    ref.apply([Admit("b", second, GREEDY)])
    ref_tokens, ref_rows, ref_feeds = run_to_end(ref, "b")
    assert ref_feeds[0] == (0, len(second))

    eng = model_engine(loaded, prefix_caching=True)
    eng.apply([Admit("a", first, GREEDY)])
    run_to_end(eng, "a")
    assert eng.allocator.num_used == 0 and eng.allocator.num_cached_free == blocks_for(len(first) + 5, BS) - 1
    hit = len(eng.allocator.match(chain_hashes(second, BS))) * BS
    assert hit == 3 * BS  # the shared full blocks; the partial one differs after the system part
    assert eng.apply([Admit("b", second, GREEDY, num_cached_tokens=hit)]) == []
    assert eng.seqs["b"].num_shared_blocks == 3
    got_tokens, rows, feeds = run_to_end(eng, "b")
    assert feeds[0] == (hit, len(second) - hit)  # only the uncached tokens are computed
    assert got_tokens == ref_tokens
    assert len(rows) == len(ref_rows) == GREEDY.max_tokens
    for ours, theirs in zip(rows, ref_rows, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def dropped_after_24(loaded):
    """Job "a" (19 prompt tokens, 30 greedy outputs) run to its end on one engine (the
    reference), and on another dropped after 24 outputs, the drop naming every known token:
    (that engine, its sequence, the known tokens, the reference's tokens and logit rows)."""
    prompt, sampling = tokens(2 * BS + 3, seed=4), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = model_engine(loaded, prefix_caching=True)
    ref.apply([Admit("a", prompt, sampling)])
    ref_tokens, ref_rows, _ = run_to_end(ref, "a")
    eng = model_engine(loaded, prefix_caching=True)
    eng.apply([Admit("a", prompt, sampling)])
    seq = eng.seqs["a"]
    while seq.num_generated < 24:
        eng.step(StepPlan(0, run_step=True, chunks={"a": seq.num_tokens - seq.num_cached}))
    known = seq.num_tokens  # all reported; the last one is not fed yet
    assert seq.num_cached == known - 1 == len(prompt) + 23
    assert eng.apply([Pause("a", KvAction.DROP, num_reusable_tokens=known)]) == []
    return eng, seq, known, ref_tokens, ref_rows


def test_a_dropped_job_resumes_from_the_blocks_of_its_known_tokens(loaded):
    """A job dropped after 24 outputs (43 tokens, 42 computed: 5 full blocks) keeps every full
    block of the tokens the drop names, and its resume computes only the tail: same tokens and
    logits as a job never dropped."""
    eng, seq, known, ref_tokens, ref_rows = dropped_after_24(loaded)
    assert eng.allocator.num_cached_free == (known - 1) // BS == 5
    hit = len(eng.allocator.match(chain_hashes(seq.token_ids, BS, (known - 1) // BS))) * BS
    assert hit == 5 * BS
    assert eng.apply([Resume("a", num_cached_tokens=hit)]) == []
    assert seq.num_cached == hit and seq.num_shared_blocks == 5
    got_tokens, rows, feeds = run_to_end(eng, "a")
    assert feeds[0] == (hit, known - hit)  # only the uncached tail is computed
    assert got_tokens == ref_tokens
    assert len(rows) == len(ref_rows) - 24 == 6
    for ours, theirs in zip(rows, ref_rows[24:], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_an_admit_whose_prefix_is_gone_computes_it_in_its_first_feed(loaded):
    eng = model_engine(loaded, prefix_caching=True)
    assert eng.apply([Admit("a", tokens(3 * BS, seed=1), GREEDY, num_cached_tokens=2 * BS)]) == []
    seq = eng.seqs["a"]
    assert (seq.num_cached, seq.num_missing, eng.allocator.num_used) == (2 * BS, 2 * BS, 2)
    assert run_to_end(eng, "a")[2][0] == (0, 3 * BS)  # stand-ins: see test_prefix_stand_ins.py
    off = model_engine(loaded, prefix_caching=False)
    [refusal] = off.apply([Admit("a", tokens(3 * BS, seed=1), GREEDY, num_cached_tokens=BS)])
    assert "without prefix caching" in refusal.reason


# ----------------------------------------------------------------- random operations

ACTIONS = list(KvAction)


class WriteGuard:
    """Wraps a virtual worker's executor and KV mover: every block written (a step's K/V, a
    quantization's output, a swap-in's target) must be private to the sequence writing it."""

    def __init__(self, engine: WorkerEngine) -> None:
        self.engine = engine
        self.num_writes = 0
        mover, executor = engine.kv.mover, engine.executor
        quantize, copy_in, execute = mover.quantize, mover.copy_in, executor.execute

        def guarded_quantize(table, num_full, keep, from_bits, to_bits):
            self.check(table[:keep])
            quantize(table, num_full, keep, from_bits, to_bits)

        def guarded_copy_in(host_ids, device_ids):
            self.check(device_ids)
            return copy_in(host_ids, device_ids)

        def guarded_execute(feeds):
            for f in feeds:
                self.check(f.seq.block_table[f.start // BS:blocks_for(f.start + f.num_tokens, BS)])
            return execute(feeds)

        mover.quantize, mover.copy_in, executor.execute = guarded_quantize, guarded_copy_in, guarded_execute

    def check(self, blocks) -> None:
        allocator = self.engine.allocator
        for b in blocks:
            assert allocator.refs(b) == 1, f"block {b} written while {allocator.refs(b)} sequences read it"
            assert allocator.hash_of(b) is None, f"cached block {b} written"
            self.num_writes += 1


def check_invariants(eng: WorkerEngine) -> None:
    allocator = eng.allocator
    allocator.check()
    readers: dict[int, int] = {}
    for s in eng.seqs.values():
        for b in s.block_table:
            readers[b] = readers.get(b, 0) + 1
        # A shared prefix stays cached while read, but for its stand-ins (blocks the cache had
        # lost, the sequence's own until its next feed computes them: test_prefix_stand_ins.py).
        first_stand_in = s.num_shared_blocks - s.num_missing // BS
        for i, b in enumerate(s.block_table[:s.num_shared_blocks]):
            assert allocator.hash_of(b) is not None or (i >= first_stand_in and allocator.refs(b) == 1)
        if s.paused and s.place is not KvPlace.NONE:
            private = place_blocks(s.place, s.num_cached - s.num_shared_blocks * BS, BS)
            assert private == len(s.block_table) - s.num_shared_blocks + len(s.host_blocks)
    for _, ids in eng.kv.pending_out:
        for b in ids:
            readers[b] = readers.get(b, 0) + 1
    # Every block read is in use, by exactly its readers: none freed while read, none leaked.
    assert {b: allocator.refs(b) for b in readers} == readers
    assert allocator.num_used == len(readers)
    host = [b for s in eng.seqs.values() for b in s.host_blocks]
    assert len(set(host)) == len(host) == eng.kv.host_allocator.num_used


def random_operation(eng: WorkerEngine, rng: random.Random, prompts: list[list[int]], n: int) -> None:
    job_id = f"j{rng.randrange(12)}"
    op = rng.choice(["admit", "share", "pause", "pause", "resume", "abort", "step", "step", "step"])
    if op in ("admit", "share") and job_id not in eng.seqs:
        base = rng.choice(prompts)
        token_ids = base[:rng.randrange(1, len(base) + 1)] + [rng.randrange(1, 50)] * rng.randrange(3)
        cached = 0
        if op == "share":  # what the scheduler's mirror would find: the longest cached prefix
            limit = (len(token_ids) - 1) // BS
            cached = len(eng.allocator.match(chain_hashes(token_ids, BS, limit))) * BS
        sampling = SamplingParams(max_tokens=rng.randrange(1, 12), ignore_eos=True)
        assert eng.apply([Admit(job_id, token_ids, sampling, num_cached_tokens=cached)]) == []
    elif op == "pause":
        seq = eng.seqs.get(job_id)
        # A drop names the tokens the scheduler knows: any prefix of the worker's tokens.
        known = rng.randrange(len(seq.token_ids) + 1) if seq is not None else 0
        eng.apply([Pause(job_id, rng.choice(ACTIONS), num_reusable_tokens=known)])
    elif op == "resume":
        seq, cached = eng.seqs.get(job_id), 0
        if seq is not None and seq.place is KvPlace.NONE:  # a dropped job takes its cached prefix
            limit = (seq.num_tokens - 1) // BS
            cached = len(eng.allocator.match(chain_hashes(seq.token_ids, BS, limit))) * BS
        assert [r.reason for r in eng.apply([Resume(job_id, num_cached_tokens=cached)])
                if "no free device blocks" not in r.reason] == []
    elif op == "abort":
        eng.abort([job_id])
    else:
        # Feeds what fits in the free blocks (the scheduler's accounting guarantees that much).
        chunks, free = {}, eng.kv.num_free_device
        for j, s in eng.seqs.items():
            left = s.num_tokens - s.num_cached
            need = blocks_for(s.num_tokens, BS) - len(s.block_table)
            if not s.paused and left > 1 and need <= free:
                chunks[j], free = left, free - need
        eng.step(StepPlan(n, run_step=True, chunks=chunks))
        for s in [s for s in eng.seqs.values() if not s.paused and len(s.block_table) < blocks_for(s.num_cached, BS)]:
            raise AssertionError(f"{s.job_id} computed past its blocks")


@settings(max_examples=3, deadline=None)
@given(st.integers(0, 2**32))
def test_ten_thousand_random_operations_leak_nothing_and_never_touch_a_read_block(seed):
    eng, guard = random_run(seed, 10_000, check_invariants)
    assert guard.num_writes > 0 and eng.allocator.num_hits > 0


def random_run(seed: int, num_operations: int, check, prepare=None):
    """``num_operations`` random operations on a virtual worker (40 device blocks, 24 host),
    ``check`` after each and once all is aborted and drained, when nothing may be left in use;
    ``prepare(engine, rng)`` first. Returns the engine and its write guard."""
    rng = random.Random(seed)
    eng = virtual_worker(num_device_blocks=40, block_size=BS, max_model_len=10_000, latency=LatencyModel(),
                         num_host_blocks=24, prefix_caching=True)
    guard = WriteGuard(eng)
    if prepare is not None:
        prepare(eng, rng)
    prompts = [[p] * BS * 2 + [p + 1] * BS * 3 for p in (100, 200)] + [[7] * BS * 6]
    for n in range(num_operations):
        random_operation(eng, rng, prompts, n)
        check(eng)
    eng.abort_all()
    eng.kv.drain()
    check(eng)
    assert eng.allocator.num_used == 0 and eng.allocator.num_free == 40
    assert eng.kv.num_free_host == 24
    return eng, guard
