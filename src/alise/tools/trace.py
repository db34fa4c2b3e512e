"""Request traces: real prompts with real output lengths, and arrival times.

A trace is JSON Lines, one request a line, in arrival order::

    {"id": "alpaca_eval:17", "prompt": "...", "prompt_tokens": 22, "output_tokens": 48,
     "arrival_s": 0.73}

Workloads built from ``shared/data/alpaca_eval`` (the 805 AlpacaEval instructions):

* ``alpaca`` — output lengths of ``text_davinci_003`` (the generator of the Alpaca data set:
  short answers, mean ~70 WordPiece tokens, CV ~1.4);
* ``chat``   — the same prompts with ``llama-2-70b-chat-hf`` lengths (mean ~390, ShareGPT-like).

Lengths are counted in the serving model's tokenizer (default: the MiniLM WordPiece tokenizer
the presets use), without special tokens, and an output is at least one token. Any data set
the predictor reads makes a trace (``load_prompts``); one without outputs (ShareGPT prompt
files) needs its output lengths from elsewhere: a fixed length, or a pool drawn from another
data set's outputs (``build_trace(output_lengths=...)``, ``output_lengths_of``).

Arrivals: Poisson at ``rate`` (exponential gaps), or bursty: Gamma gaps with coefficient of
variation ``cv`` (shape ``1/cv**2``) and the same mean. Requests are drawn from the data set
in a seeded random order; past its size the order repeats with a new shuffle.

Conversations (``alise.tools.conversations``): a request may be turn ``turn`` (from 0) of the
conversation ``conversation_id``, and then carries ``think_time_s``; ``query`` is its own text
(the latest user message) where ``prompt`` renders it after a system prompt or earlier turns::

    {"id": "alpaca_eval:17", "prompt": "...", "prompt_tokens": 812, "output_tokens": 301,
     "arrival_s": 14.2, "conversation_id": "c3", "turn": 2, "think_time_s": 4.1,
     "query": "..."}

Release rule (:class:`Releases`, the one implementation the simulator and ``alise bench`` use):
a request without a conversation, or a turn 0, is sent at its ``arrival_s``; turn k+1 is sent
``think_time_s`` after turn k's answer ended, so its clock depends on how fast the server
answered, as in a chat (vLLM's and SGLang's multi-turn benchmarks send the next turn after the
previous completes). The ``arrival_s`` of a later turn is the previous turn's plus its think
time: the earliest it can be sent (answers taking no time), which keeps the file in arrival
order; a replayer that ignores conversations sends it then. Files without these fields read as
before, and single-turn traces are written without them.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
WORKLOADS = {
    "alpaca": "alpaca_eval/text_davinci_003.jsonl.gz",
    "chat": "alpaca_eval/llama-2-70b-chat-hf.jsonl.gz",
}


@dataclass(frozen=True)
class TraceRequest:
    id: str
    prompt: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    #: The conversation this request is a turn of ("": none).
    conversation_id: str = ""
    #: Its turn in the conversation, from 0.
    turn: int = 0
    #: Turns after the first: seconds after the previous turn's answer ended that it is sent.
    think_time_s: float = 0.0
    #: Its own text, where ``prompt`` renders it with a system prompt or earlier turns ("": the prompt).
    query: str = ""

    @property
    def is_follow_up(self) -> bool:
        """A turn after the first: released by its predecessor's end, not by the clock."""
        return bool(self.conversation_id) and self.turn > 0

    @property
    def text(self) -> str:
        """What the request itself asks: ``query``, or the prompt when it has none."""
        return self.query or self.prompt


#: Fields written only when they differ from their default (single-turn files stay as they were).
_OPTIONAL = {"conversation_id": "", "turn": 0, "think_time_s": 0.0, "query": ""}


def data_dir() -> Path:
    import os

    return Path(os.environ.get("ALISE_DATA_DIR", DATA_DIR)).resolve()


def workload_path(workload: str) -> Path:
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    return data_dir() / WORKLOADS[workload]


def arrival_times(num: int, rate: float, *, bursty: bool = False, cv: float = 3.0,
                  seed: int = 0) -> list[float]:
    """``num`` arrival times (first at its gap from 0) with mean rate ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if cv <= 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    rng = random.Random(seed)
    mean_gap = 1.0 / rate
    t = 0.0
    out = []
    for _ in range(num):
        if bursty:
            shape = 1.0 / (cv * cv)
            t += rng.gammavariate(shape, mean_gap / shape)
        else:
            t += rng.expovariate(rate)
        out.append(t)
    return out


class MissingOutputsError(ValueError):
    """A data set without outputs where a trace needs output lengths from them."""


def load_prompts(path: str | Path) -> list[tuple[str, str, str | None]]:
    """(prompt_id, prompt, output or None) of every record of a data set file, in any format the
    predictor reads (:mod:`alise.predictor.datasets`: AlpacaEval JSONL, ShareGPT prompts JSONL,
    Alpaca's ``alpaca_data.json``, ShareGPT's ``ShareGPT_V3_unfiltered_cleaned_split.json``;
    gzip or not)."""
    from alise.predictor.datasets import load_records

    return [(r.prompt_id, r.prompt, r.output) for r in load_records(path)]


def load_pairs(path: str | Path) -> list[tuple[str, str, str]]:
    """(prompt_id, prompt, output) of every record with an output."""
    pairs = [p for p in load_prompts(path) if p[2] is not None]
    if not pairs:
        raise MissingOutputsError(f"{path}: no records with outputs (a trace needs output lengths)")
    return pairs


def output_lengths_of(path: str | Path, count_tokens=None) -> list[int]:
    """The output lengths (tokens, at least one) of the records of ``path`` that have outputs:
    a pool that prompts without outputs draw their lengths from."""
    count_tokens = count_tokens or default_counter()
    return [max(n, 1) for n in count_tokens([o for _, _, o in load_pairs(path)])]


def default_tokenizer():
    """Token ids of texts in the serving model's tokenizer (default MiniLM WordPiece), without
    special tokens."""
    from alise.modelinfo.tokenizer import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    tokenizer.model_max_length = 1 << 30

    def tokenize(texts: Sequence[str]) -> list[list[int]]:
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    return tokenize


def default_counter():
    """Token counter of the serving model's tokenizer (default MiniLM WordPiece)."""
    tokenize = default_tokenizer()

    def count(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tokenize(texts)]

    return count


def build_trace(records: Sequence[tuple[str, str, str | None]], *, num: int, rate: float,
                bursty: bool = False, cv: float = 3.0, seed: int = 0, count_tokens=None,
                output_lengths: int | Sequence[int] | None = None) -> list[TraceRequest]:
    """A trace of ``num`` requests drawn from ``records`` (id, prompt, output text or None).

    Output lengths come from ``output_lengths``: None, each record's own output (records without
    one are left out); an int, that many tokens for every request; a sequence, a pool of lengths
    each record draws one from (seeded by ``seed``; a prompt drawn twice keeps its length)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    count_tokens = count_tokens or default_counter()
    records, output_lens = _output_lengths(records, output_lengths, count_tokens, seed)
    prompt_lens = count_tokens([p for _, p, _ in records])
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < num:
        chunk = list(range(len(records)))
        rng.shuffle(chunk)
        order += chunk
    times = arrival_times(num, rate, bursty=bursty, cv=cv, seed=seed + 1)
    out = []
    for i, t in zip(order[:num], times, strict=True):
        pid, prompt, _ = records[i]
        out.append(TraceRequest(pid, prompt, max(prompt_lens[i], 1), max(output_lens[i], 1),
                                round(t, 6)))
    return out


def _output_lengths(records, output_lengths, count_tokens, seed: int):
    if output_lengths is None:
        records = [r for r in records if r[2] is not None]
        if not records:
            raise MissingOutputsError("no records with outputs, and no output lengths given")
        return records, count_tokens([o for _, _, o in records])
    if not records:
        raise ValueError("no records")
    if isinstance(output_lengths, int):
        if output_lengths < 1:
            raise ValueError(f"output length must be >= 1, got {output_lengths}")
        return records, [output_lengths] * len(records)
    if not output_lengths:
        raise ValueError("the pool of output lengths is empty")
    rng = random.Random(seed + 2)
    return records, [rng.choice(output_lengths) for _ in records]


def write_trace(requests: Sequence[TraceRequest], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in requests:
            row = {k: v for k, v in asdict(r).items() if k not in _OPTIONAL or v != _OPTIONAL[k]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_trace(path: str | Path) -> list[TraceRequest]:
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append(TraceRequest(
                    str(obj["id"]), obj["prompt"], int(obj["prompt_tokens"]), int(obj["output_tokens"]),
                    float(obj["arrival_s"]), str(obj.get("conversation_id", "")), int(obj.get("turn", 0)),
                    float(obj.get("think_time_s", 0.0)), str(obj.get("query", ""))))
            except KeyError as exc:
                raise ValueError(f"{path}:{line_no}: trace record lacks {exc}") from None
            except (ValueError, TypeError, AttributeError, RecursionError) as exc:  # not JSON, not an object
                raise ValueError(f"{path}:{line_no}: not a trace record ({type(exc).__name__}: {exc})") from None
    if not out:
        raise ValueError(f"{path}: empty trace")
    out.sort(key=lambda r: r.arrival_s)
    check_conversations(out, str(path))
    return out


def conversations(requests: Sequence[TraceRequest]) -> dict[str, list[int]]:
    """Request indexes of each conversation, in turn order."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        if r.conversation_id:
            out.setdefault(r.conversation_id, []).append(i)
    for turns in out.values():
        turns.sort(key=lambda i: requests[i].turn)
    return out


def check_conversations(requests: Sequence[TraceRequest], where: str = "trace") -> None:
    """``ValueError`` unless every conversation has turns 0, 1, ... once each, later turns not
    before earlier ones, and think times >= 0."""
    for cid, turns in conversations(requests).items():
        numbers = [requests[i].turn for i in turns]
        if numbers != list(range(len(numbers))):
            raise ValueError(f"{where}: conversation {cid!r} has turns {numbers[:10]}, not 0, 1, 2, ...")
        for a, b in pairwise(turns):
            if requests[b].think_time_s < 0 or requests[b].arrival_s < requests[a].arrival_s:
                raise ValueError(f"{where}: conversation {cid!r} turn {requests[b].turn} has a negative "
                                 "think time or arrives before the turn it follows")


def previous_outputs(requests: Sequence[TraceRequest]) -> list[list[int]]:
    """Per request, the output tokens of the earlier turns of its conversation, oldest first."""
    out: list[list[int]] = [[] for _ in requests]
    for turns in conversations(requests).values():
        for k, i in enumerate(turns):
            out[i] = [requests[j].output_tokens for j in turns[:k]]
    return out


class Releases:
    """When each request of a trace is sent (the module's release rule).

    Requests that are not follow-up turns wait on the clock (their ``arrival_s``); a follow-up
    waits on its predecessor: :meth:`finished` with that request's end time releases it
    ``think_time_s`` later. Release order among requests due together is by release time, then
    index, so a trace without conversations is released exactly in arrival order."""

    def __init__(self, requests: Sequence[TraceRequest]) -> None:
        self._think = [r.think_time_s for r in requests]
        self._successor: dict[int, int] = {}
        for turns in conversations(requests).values():
            self._successor.update(pairwise(turns))
        followers = set(self._successor.values())
        self._due = [(r.arrival_s, i) for i, r in enumerate(requests) if i not in followers]
        heapq.heapify(self._due)
        self._num_waiting = len(followers)
        self._awaited: set[int] = set()  # released requests whose successor waits on them

    def __bool__(self) -> bool:
        """Whether any request is not released yet."""
        return bool(self._due) or self._num_waiting > 0

    def next_s(self) -> float | None:
        """The earliest release time known now (None: none, or only successors of requests
        still running)."""
        return self._due[0][0] if self._due else None

    def pop_due(self, now_s: float) -> list[tuple[int, float]]:
        """(index, release time) of every request released at or before ``now_s``."""
        out = []
        while self._due and self._due[0][0] <= now_s:
            t, i = heapq.heappop(self._due)
            out.append((i, t))
            if i in self._successor:
                self._awaited.add(i)
        return out

    def awaited(self) -> list[int]:
        """Released requests whose successor waits for them to finish."""
        return sorted(self._awaited)

    def finished(self, index: int, end_s: float) -> None:
        """Request ``index`` ended (answered, or failed) at ``end_s``: its successor, if any, is
        released ``think_time_s`` later."""
        if index in self._awaited:
            self._awaited.remove(index)
            nxt = self._successor[index]
            heapq.heappush(self._due, (end_s + self._think[nxt], nxt))
            self._num_waiting -= 1


def mean_rate(requests: Sequence[TraceRequest]) -> float:
    """Requests per second over the span of the clock's arrivals (n / the last arrival that is
    not a follow-up turn: conversations start at this rate over the number of turns)."""
    last = max(r.arrival_s for r in requests if not r.is_follow_up)
    return len(requests) / last if last > 0 else float("inf")


def with_start_times(requests: Sequence[TraceRequest], times: Sequence[float]) -> list[TraceRequest]:
    """The same requests in the same order (estimates by index still apply), those that are not
    follow-up turns at ``times`` (in their order); each follow-up at its predecessor's new
    arrival plus its think time."""
    out = list(requests)
    starts = [i for i, r in enumerate(requests) if not r.is_follow_up]
    if len(times) != len(starts):
        raise ValueError(f"{len(starts)} requests start on the clock, but {len(times)} times were given")
    for i, t in zip(starts, times, strict=True):
        out[i] = replace(out[i], arrival_s=t)
    for turns in conversations(requests).values():
        for a, b in pairwise(turns):
            out[b] = replace(out[b], arrival_s=out[a].arrival_s + out[b].think_time_s)
    return out


def rescale(requests: Sequence[TraceRequest], rate: float) -> list[TraceRequest]:
    """The same requests with arrivals stretched or squeezed to mean rate ``rate`` (think times
    between turns kept). Arrivals that span no time (a burst at 0 s: its own rate is infinite)
    have nothing to stretch: they are spread evenly at ``rate``; an infinite ``rate`` is a burst."""
    starts = [r.arrival_s for r in requests if not r.is_follow_up]
    own = mean_rate(requests)
    if math.isinf(rate):
        return with_start_times(requests, [0.0] * len(starts))
    if math.isinf(own):
        return with_start_times(requests, [i / rate for i in range(len(starts))])
    factor = own / rate
    return with_start_times(requests, [a * factor for a in starts])


def describe(requests: Sequence[TraceRequest]) -> dict:
    """Rate, span and length statistics of a trace (what `alise trace` prints)."""
    import statistics

    outs = sorted(r.output_tokens for r in requests)
    starts = sorted(r.arrival_s for r in requests if not r.is_follow_up)
    gaps = [b - a for a, b in pairwise(starts)]
    mean_gap = statistics.fmean(gaps) if gaps else 0.0
    convs = conversations(requests)
    thinks = [r.think_time_s for r in requests if r.is_follow_up]
    return dict(
        num=len(requests), rate=mean_rate(requests), span_s=max(r.arrival_s for r in requests),
        gap_cv=(statistics.pstdev(gaps) / mean_gap) if mean_gap > 0 else 0.0,
        prompt_mean=statistics.fmean(r.prompt_tokens for r in requests),
        output_mean=statistics.fmean(outs), output_p50=outs[len(outs) // 2],
        output_p90=outs[min(len(outs) - 1, int(0.9 * len(outs)))],
        num_conversations=len(convs),
        turns_mean=statistics.fmean(len(t) for t in convs.values()) if convs else 0.0,
        think_mean_s=statistics.fmean(thinks) if thinks else 0.0)
