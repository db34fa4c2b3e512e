"""Overlapped steps (``alise worker --async-steps``) against the synchronous engine, on a real
tiny model on the CPU: the same plans give the same token streams, finish reasons and
refusals, over chunked prefills, decodes, a job stopping while it is in the next plan, a job
ending by length, an abort, a swap and a drop with their resumes, greedy and seeded sampling.

The plans are made once, by a planner that watches the synchronous engine (chunks of at most
``CHUNK`` tokens, commands from a script), then replayed on a fresh engine step by step as
the overlapped step loop does: each plan launched before the step ahead of it is finished
unless ``WorkerEngine.can_overlap`` says no or aborts are waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from alise.core.commands import Admit, KvAction, Pause, Resume, StepPlan
from alise.core.job import FinishReason
from alise.core.sampling import SamplingParams
from alise.worker.engine import WorkerEngine
from alise.worker.kernels.triton_unified import UnifiedConfig
from alise.worker.model.attention import build_attention_metadata
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.kernel_plan import KernelPlan
from alise.worker.model.loader import load_model
from alise.worker.model.overlap import PinnedUploads, TokenGather
from alise.worker.model.runner import ModelRunner
from alise.worker.step_loop import StepLoop
from tinymodels import make_tiny_model_dir

BLOCK_SIZE = 8
CHUNK = 12
NUM_STEPS = 26
PINNED_CALL = PinnedUploads.__call__


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("async-llama"), "llama")
    return load_model(str(path), device="cpu")


def make_engine(loaded, mode: str) -> WorkerEngine:
    runner = ModelRunner(loaded, num_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=32)
    if mode == "graph-buffers":  # the CUDA graphs' static buffers, run eagerly on the CPU
        runner.ops.plan = KernelPlan(unified={16: UnifiedConfig(), 32: UnifiedConfig()})
        runner.decode_graphs = runner.make_decode_graphs(8)
        runner.mixed_graphs = runner.make_mixed_graphs()
    return make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len, num_host_blocks=32)


def prompt(n: int, first: int) -> list[int]:
    return [(first + 37 * i) % 900 + 5 for i in range(n)]


def script(stop_token: int | None) -> tuple[dict[int, list], dict[int, list[str]]]:
    """Commands before each step, and aborts applied before each step."""
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                            stop_token_ids=[stop_token] if stop_token is not None else [])
    seeded = SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    top_k = SamplingParams(max_tokens=40, temperature=1.0, top_k=50, seed=3, ignore_eos=True)
    plain = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    commands = {
        0: [Admit("stop", prompt(20, 1), greedy), Admit("seeded", prompt(13, 2), seeded)],
        1: [Admit("chunked", prompt(30, 3), top_k)],
        3: [Admit("aborted", prompt(9, 4), plain), Admit("swapped", prompt(10, 5), plain),
            Admit("dropped", prompt(11, 6), top_k)],
        9: [Pause("swapped", KvAction.SWAP_TO_HOST)],
        11: [Pause("dropped", KvAction.DROP)],
        13: [Resume("swapped")],
        15: [Resume("dropped")],
    }
    return commands, {8: ["aborted"]}


def make_plans(engine: WorkerEngine, commands: dict[int, list], aborts: dict[int, list[str]]):
    """Runs the script synchronously, planning each step from the engine's state; returns
    the plans and the reports."""
    plans, reports = [], []
    for step_id in range(NUM_STEPS):
        if step_id in aborts:
            engine.abort(aborts[step_id], step_id - 1)
        cmds = commands.get(step_id, [])
        pausing = {c.job_id for c in cmds if isinstance(c, Pause)}
        chunks = {}
        for job_id, seq in engine.seqs.items():
            left = seq.num_tokens - seq.num_cached
            if left > 1 and job_id not in pausing and (not seq.paused or Resume(job_id) in cmds):
                chunks[job_id] = min(CHUNK, left)
        for c in cmds:
            if isinstance(c, Admit):
                chunks[c.job_id] = min(CHUNK, len(c.token_ids))
            elif isinstance(c, Resume) and engine.seqs[c.job_id].num_cached == 0:
                chunks[c.job_id] = min(CHUNK, engine.seqs[c.job_id].num_tokens)
        plan = StepPlan(step_id, commands=cmds, chunks=chunks, run_step=True)
        plans.append(plan)
        reports.append(engine.run(plan))
    return plans, reports


def run_overlapped(engine: WorkerEngine, plans: list[StepPlan], aborts: dict[int, list[str]], launch=None):
    """The overlapped step loop's order (``StepLoop._run_overlapped``) with every plan queued;
    ``launch(plan, flight)`` in place of ``engine.launch`` (a test that watches each launch)."""
    launch = launch or engine.launch
    reports, flight = [], None
    for plan in plans:
        waiting = aborts.get(plan.step_id)
        if flight is not None and (waiting or not engine.can_overlap(flight, plan)):
            reports.append(engine.finish(flight))
            flight = None
        if waiting:
            engine.abort(waiting, plan.step_id - 1)
        step = launch(plan, flight)
        if flight is not None:
            reports.append(engine.finish(flight))
        flight = step
    reports.append(engine.finish(flight))
    return reports


def streams(reports) -> dict[str, tuple[list[int], FinishReason | None]]:
    out: dict[str, tuple[list[int], FinishReason | None]] = {}
    for report in reports:
        for o in report.outputs:
            tokens, _ = out.get(o.job_id, ([], None))
            out[o.job_id] = (tokens + o.token_ids, o.finish_reason)
    return out


def outputs(reports):
    return [[(o.job_id, o.token_ids, o.finish_reason, o.num_tokens) for o in r.outputs] for r in reports]


@pytest.fixture(scope="module")
def scenario(loaded):
    """The stop token: the fourth token the "stop" job generates when nothing stops it (one
    not generated before it), so that job stops on it while its next step is launched."""
    free = streams(make_plans(make_engine(loaded, "eager"), *script(None))[1])["stop"][0]
    index = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    commands, aborts = script(free[index])
    plans, reports = make_plans(make_engine(loaded, "eager"), commands, aborts)
    return plans, aborts, reports, index


@pytest.mark.parametrize("mode", ["eager", "graph-buffers"])
def test_overlapped_steps_give_the_synchronous_tokens(loaded, scenario, mode, monkeypatch):
    plans, aborts, expected, stop_index = scenario
    gathered = []
    apply = TokenGather.apply
    monkeypatch.setattr(TokenGather, "apply", lambda self, ids: (gathered.append(len(self.rows)), apply(self, ids)))
    got = run_overlapped(make_engine(loaded, mode), plans, aborts)

    assert outputs(got) == outputs(expected)
    assert [r.refused for r in got] == [r.refused for r in expected] and not any(r.refused for r in got)
    assert [r.step_id for r in got] == list(range(NUM_STEPS))
    final = streams(expected)
    assert final["stop"] == (final["stop"][0], FinishReason.STOP) and len(final["stop"][0]) == stop_index + 1
    assert final["seeded"][1] is FinishReason.LENGTH and len(final["seeded"][0]) == 9
    assert "aborted" in final and final["aborted"][1] is None
    assert len(final["swapped"][0]) > 10 and len(final["dropped"][0]) > 10  # ran on after their resumes
    assert sum(gathered) >= 40  # most decodes took their ids on the device
    # The stopped job was fed once more (its token dropped); the one ending by length was not.
    stop_step = next(r.step_id for r in expected for o in r.outputs if o.job_id == "stop" and o.finish_reason)
    seeded_step = next(r.step_id for r in expected for o in r.outputs if o.job_id == "seeded" and o.finish_reason)
    assert got[stop_step + 1].num_seqs == expected[stop_step + 1].num_seqs + 1
    assert got[seeded_step + 1].num_seqs == expected[seeded_step + 1].num_seqs


@pytest.mark.parametrize("broken", ["no-gather", "stale-row"])
def test_a_wrong_token_gather_changes_the_tokens(loaded, scenario, broken, monkeypatch):
    """The comparison above sees the gathered ids: a gather that leaves the placeholder, or
    takes another row's token, changes the streams."""
    plans, aborts, expected, _ = scenario
    if broken == "no-gather":
        monkeypatch.setattr(TokenGather, "apply", lambda self, ids: None)
    else:
        apply = TokenGather.apply
        monkeypatch.setattr(TokenGather, "apply", lambda self, ids: apply(
            TokenGather(self.rows, self.source_rows.flip(0), self.source), ids))
    got = run_overlapped(make_engine(loaded, "eager"), plans, aborts)
    assert outputs(got) != outputs(expected)


def test_no_overlap_across_a_census_or_a_pause_of_a_job_in_flight(loaded):
    engine = make_engine(loaded, "eager")
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    first = engine.launch(StepPlan(0, commands=[Admit("a", prompt(5, 1), greedy)], chunks={"a": 5}, run_step=True))
    assert engine.can_overlap(first, StepPlan(1, run_step=True))
    assert engine.can_overlap(first, StepPlan(1, commands=[Admit("b", prompt(5, 2), greedy)], run_step=True))
    assert not engine.can_overlap(first, StepPlan(1, commands=[Pause("a", KvAction.SWAP_TO_HOST)], run_step=True))
    engine.finish(first)
    census = engine.launch(StepPlan(1, run_step=True, census=True))
    assert not engine.can_overlap(census, StepPlan(2, run_step=True))
    assert engine.finish(census).census_job_ids == ["a"]


@pytest.mark.parametrize("stops", [False, True])
def test_a_job_refused_while_its_token_is_in_flight_keeps_that_token(loaded, stops):
    """Four blocks of 8: "a" (7 prompt tokens, one block) and "b" (23, three) fill them. At
    step 2 "a" needs a second block and none is free: the synchronous engine reports its
    step-1 token, then refuses it at step 2 (its block goes to "b"). Launched behind step 1,
    step 2 refuses "a" before step 1's tokens are read: that token must still be reported,
    or the scheduler finds step 1 short of a token and drops the worker. When that token stops
    "a" (``stops``), the synchronous engine never fed "a" again: no refusal at step 2."""
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    def engine():
        runner = ModelRunner(loaded, num_blocks=4, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=32)
        return make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len,
                                  num_host_blocks=8)

    def make_plans(sampling):
        admits = [Admit("a", prompt(7, 1), sampling), Admit("b", prompt(23, 2), greedy)]
        return [StepPlan(0, commands=admits, chunks={"a": 7, "b": 23}, run_step=True)] + [
            StepPlan(i, run_step=True) for i in range(1, 5)]

    plans = make_plans(greedy)
    sync = engine()
    expected = [sync.run(plan) for plan in plans]
    if stops:
        second = expected[1].outputs[0].token_ids[0]
        plans = make_plans(SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[second]))
        sync = engine()
        expected = [sync.run(plan) for plan in plans]
        assert expected[1].outputs[0].finish_reason is FinishReason.STOP and not expected[2].refused
    else:
        assert [r.job_id for r in expected[2].refused] == ["a"]
    assert [o.job_id for o in expected[1].outputs] == ["a", "b"]

    got = run_overlapped(engine(), plans, {})
    assert outputs(got) == outputs(expected)
    assert [r.refused for r in got] == [r.refused for r in expected]


def device_copies(monkeypatch) -> list:
    """Records every ``Tensor.to`` that names a device (a pageable upload on CUDA)."""
    calls = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args):
            calls.append((tuple(self.shape), args, kwargs))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    return calls


def mixed_chunks(cache_seq: SeqChunk) -> list[SeqChunk]:
    """A decode of the cached sequence, its continuation chunk, and four fresh prompts (past
    the threshold of the batched fresh call) of which one needs no logits."""
    chunks = [SeqChunk([7], 11, cache_seq.block_table), SeqChunk(prompt(5, 9), 12, cache_seq.block_table)]
    for i in range(4):
        table = [10 + 4 * i + b for b in range(4)]
        chunks.append(SeqChunk(prompt(9 + i, 20 + i), 0, table, needs_logits=i != 2))
    return chunks


@pytest.mark.parametrize("plan", ["split", "fresh-batch", "unified"])
def test_an_eager_step_with_an_upload_gives_the_same_inputs_and_logits(loaded, plan, monkeypatch):
    """An eager mixed step given ``upload`` (as an overlapped launch passes it) sends every
    host-built input through it, none through ``.to(device)``, and builds the synchronous
    step's metadata and logits."""
    runners = []
    for _ in range(2):
        runner = ModelRunner(loaded, num_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=32)
        runner.min_batched_fresh = 3 if plan == "fresh-batch" else 0
        if plan == "unified":
            runner.ops.plan = KernelPlan(unified={64: UnifiedConfig()})
        first = SeqChunk(prompt(11, 1), 0, [0, 1, 2, 3])
        runner.execute([first])
        runners.append(runner)
    chunks = mixed_chunks(first)
    expected = runners[0].execute(chunks)
    args = ([c.start_pos for c in chunks], [len(c.token_ids) for c in chunks], [c.block_table for c in chunks])
    kwargs = dict(block_size=BLOCK_SIZE, device=torch.device("cpu"), min_batched_fresh=runners[0].min_batched_fresh,
                  unified_config=runners[0].plan.unified_config(64))
    sync_meta = build_attention_metadata(*args, **kwargs)

    upload = PinnedUploads(torch.device("cpu"))
    uploads = []
    monkeypatch.setattr(PinnedUploads, "__call__", lambda self, values, dtype: (
        uploads.append(dtype), PINNED_CALL(self, values, dtype))[1])
    copies = device_copies(monkeypatch)
    got = runners[1].execute(chunks, upload=upload)
    meta = build_attention_metadata(*args, **kwargs, upload=upload)
    assert copies == []
    assert len(uploads) >= 2 * 4  # ids, logit rows and metadata, in both calls
    assert torch.equal(got, expected)
    assert_same_metadata(meta, sync_meta)
    assert (meta.unified is not None, meta.fresh is not None) == (plan == "unified", plan == "fresh-batch")


def test_the_synchronous_eager_step_copies_with_to_device(loaded, monkeypatch):
    """The spy above sees the synchronous path's copies (so its empty list means something)."""
    runner = ModelRunner(loaded, num_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=32)
    first = SeqChunk(prompt(11, 1), 0, [0, 1, 2, 3])
    runner.execute([first])
    copies = device_copies(monkeypatch)
    runner.execute(mixed_chunks(first))
    assert len(copies) >= 4


def assert_same_metadata(a, b) -> None:
    def same(x, y):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        elif dataclasses.is_dataclass(x):
            assert type(x) is type(y)
            for f in dataclasses.fields(x):
                same(getattr(x, f.name), getattr(y, f.name))
        elif isinstance(x, tuple):
            assert len(x) == len(y)
            for u, v in zip(x, y, strict=True):
                same(u, v)
        else:
            assert x == y

    same(a, b)


class LoopHost:
    """What the step thread needs of the worker service, over a real engine."""

    def __init__(self, engine: WorkerEngine) -> None:
        self.engine = engine

    def execute(self, plan, waited_s):
        return self.engine.run(plan)

    def count_cycle(self, wait_s, execute_s, report) -> None:
        pass

    def record(self, report, waited_s):
        return report

    def step_failed(self) -> None:
        raise AssertionError("a step failed")


def test_a_plan_that_comes_while_the_step_runs_is_launched_behind_it(loaded, monkeypatch):
    """The device is kept busy (``step_done`` false) until released; the next plan is
    submitted only once the first step is launched: it must still go behind that step (no
    plan queued at launch is no reason to finish the step in flight while the device runs it)."""
    engine = make_engine(loaded, "eager")
    released = threading.Event()
    launches: list[tuple[int, bool]] = []
    real_launch = engine.launch

    def launch(plan, previous=None):
        launches.append((plan.step_id, previous is not None))
        return real_launch(plan, previous)

    monkeypatch.setattr(engine, "launch", launch)
    monkeypatch.setattr(engine, "step_done", lambda launched: released.is_set())
    loop = asyncio.new_event_loop()
    steps = StepLoop(LoopHost(engine), loop, overlap=True)
    assert steps.overlap
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    steps.submit(StepPlan(0, commands=[Admit("a", prompt(5, 1), greedy)], chunks={"a": 5}, run_step=True))
    deadline = time.monotonic() + 10
    while not launches and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.02)  # the thread is now waiting with step 0 "on the device"
    steps.submit(StepPlan(1, run_step=True))
    while len(launches) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    released.set()
    loop.run_until_complete(steps.close())
    loop.run_until_complete(asyncio.sleep(0))  # the reports' callbacks
    assert launches == [(0, False), (1, True)]
    reports = [steps.reports.get_nowait() for _ in range(steps.reports.qsize())]
    assert [r.step_id for r in reports] == [0, 1]
    assert [o.job_id for o in reports[1].outputs] == ["a"]
    loop.close()
