"""Request traces: real prompts with real output lengths, and arrival times.

A trace is JSON Lines, one request a line, in arrival order::

    {"id": "alpaca_eval:17", "prompt": "...", "prompt_tokens": 22, "output_tokens": 48,
     "arrival_s": 0.73}

Workloads built from ``shared/data/alpaca_eval`` (the 805 AlpacaEval instructions):

* ``alpaca`` — output lengths of ``text_davinci_003`` (the generator of the Alpaca data set:
  short answers, mean ~70 WordPiece tokens, CV ~1.4);
* ``chat``   — the same prompts with ``llama-2-70b-chat-hf`` lengths (mean ~390, ShareGPT-like).

Lengths are counted in the serving model's tokenizer (default: the MiniLM WordPiece tokenizer
the presets use), without special tokens, and an output is at least one token.

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


def load_pairs(path: str | Path) -> list[tuple[str, str, str]]:
    """(prompt_id, prompt, output) of every record with an output.

    Any format the predictor's loaders read (AlpacaEval JSONL, Alpaca JSON, ShareGPT JSON);
    AlpacaEval JSONL (optionally gzip) is read here directly when they are not installed.
    """
    try:
        from alise.predictor.datasets import load_records
    except ImportError:
        load_records = None
    if load_records is not None:
        pairs = [(r.prompt_id, r.prompt, r.output) for r in load_records(path)
                 if r.output is not None]
    else:
        pairs = _load_alpaca_eval(Path(path))
    if not pairs:
        raise ValueError(f"{path}: no records with outputs (a trace needs output lengths)")
    return pairs


def _load_alpaca_eval(path: Path) -> list[tuple[str, str, str]]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(f"alpaca_eval:{r.get('id', i)}", r["instruction"], r["output"])
            for i, r in enumerate(rows) if r.get("output") is not None]


def default_counter():
    """Token counter of the serving model's tokenizer (default MiniLM WordPiece)."""
    from alise.worker.loader import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    tokenizer.model_max_length = 1 << 30

    def count(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return count


def build_trace(pairs: Sequence[tuple[str, str, str]], *, num: int, rate: float,
                bursty: bool = False, cv: float = 3.0, seed: int = 0,
                count_tokens=None) -> list[TraceRequest]:
    """A trace of ``num`` requests drawn from ``pairs`` (id, prompt, output text)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    count_tokens = count_tokens or default_counter()
    prompt_lens = count_tokens([p for _, p, _ in pairs])
    output_lens = count_tokens([o for _, _, o in pairs])
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < num:
        chunk = list(range(len(pairs)))
        rng.shuffle(chunk)
        order += chunk
    times = arrival_times(num, rate, bursty=bursty, cv=cv, seed=seed + 1)
    out = []
    for i, t in zip(order[:num], times):
        pid, prompt, _ = pairs[i]
        out.append(TraceRequest(pid, prompt, max(prompt_lens[i], 1), max(output_lens[i], 1),
                                round(t, 6)))
    return out


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
