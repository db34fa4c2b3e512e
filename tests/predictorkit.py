"""A predictor's bootstrap data for tests: two kinds of prompt with very different output lengths
(a one-word answer, a 400-word essay), alternating, so a trained head tells them apart."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

TOPICS = [("Write a one-word answer: what color is the sky", 2), ("Write a long detailed essay about", 400)]


def write_two_topics(path: Path, num: int = 40, generator: str = "m1") -> Path:
    """``num`` AlpacaEval-shaped records (instruction, output, generator) gzipped at ``path``."""
    with gzip.open(path, "wt") as f:
        for i in range(num):
            prompt, words = TOPICS[i % 2]
            f.write(json.dumps({"id": i, "instruction": f"{prompt} (item {i})", "output": "word " * words,
                                "generator": generator}) + "\n")
    return path
