"""What every cross-fit of the simulator shares: prompts dealt into folds, and the AlpacaEval
answers the predictor service warms up from."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence


def fold_of(ids: Sequence[str], num_folds: int, seed: int) -> dict[str, int]:
    """Fold of each distinct id: a seeded shuffle dealt round-robin."""
    distinct = sorted(set(ids))
    random.Random(seed).shuffle(distinct)
    return {pid: i % num_folds for i, pid in enumerate(distinct)}


def alpaca_eval_observations(texts) -> tuple[list[str], list[str], list[int]]:
    """(text, generator, output tokens) of every AlpacaEval answer (the files in the data dir)
    to an instruction among ``texts``: what the predictor service warms up from."""
    import gzip

    from alise.predictor.tokens import TokenCounter
    from alise.tools.trace import data_dir

    wanted = set(texts)
    found, models, outputs = [], [], []
    for path in sorted((data_dir() / "alpaca_eval").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        hits = [r for r in rows if r["instruction"] in wanted]
        if not hits:
            continue
        found += [r["instruction"] for r in hits]
        models += [str(hits[0].get("generator") or path.name)] * len(hits)
        outputs += [r["output"] for r in hits]
    return found, models, TokenCounter().count(outputs) if outputs else []
