"""Files the benchmark scripts read."""

from __future__ import annotations

import gzip
from typing import TextIO


def open_text(path: str) -> TextIO:
    """A text file, gzip-compressed where its name ends in .gz (the committed logs are)."""
    return (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8")  # type: ignore[return-value]
