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
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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


def default_counter():
    """Token counter of the serving model's tokenizer (default MiniLM WordPiece)."""
    from alise.worker.loader import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    tokenizer.model_max_length = 1 << 30

    def count(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

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
    for i, t in zip(order[:num], times):
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
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")


def read_trace(path: str | Path) -> list[TraceRequest]:
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            try:
                out.append(TraceRequest(str(obj["id"]), obj["prompt"], int(obj["prompt_tokens"]),
                                        int(obj["output_tokens"]), float(obj["arrival_s"])))
            except KeyError as exc:
                raise ValueError(f"{path}:{line_no}: trace record lacks {exc}") from None
    if not out:
        raise ValueError(f"{path}: empty trace")
    return sorted(out, key=lambda r: r.arrival_s)


def mean_rate(requests: Sequence[TraceRequest]) -> float:
    """Requests per second over the arrival span (n / last arrival)."""
    last = max(r.arrival_s for r in requests)
    return len(requests) / last if last > 0 else float("inf")


def rescale(requests: Sequence[TraceRequest], rate: float) -> list[TraceRequest]:
    """The same requests with arrivals stretched or squeezed to mean rate ``rate``."""
    factor = mean_rate(requests) / rate
    return [TraceRequest(r.id, r.prompt, r.prompt_tokens, r.output_tokens, r.arrival_s * factor)
            for r in requests]


def describe(requests: Sequence[TraceRequest]) -> dict:
    """Rate, span and length statistics of a trace (what `alise trace` prints)."""
    import statistics

    outs = sorted(r.output_tokens for r in requests)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]
    mean_gap = statistics.fmean(gaps) if gaps else 0.0
    return dict(
        num=len(requests), rate=mean_rate(requests), span_s=max(r.arrival_s for r in requests),
        gap_cv=(statistics.pstdev(gaps) / mean_gap) if mean_gap > 0 else 0.0,
        prompt_mean=statistics.fmean(r.prompt_tokens for r in requests),
        output_mean=statistics.fmean(outs), output_p50=outs[len(outs) // 2],
        output_p90=outs[min(len(outs) - 1, int(0.9 * len(outs)))])
