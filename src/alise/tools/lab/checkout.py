"""Another checkout of ALISE run beside this one (before/after comparisons on one machine)."""

from __future__ import annotations

from pathlib import Path


def source_roots(checkout: str | Path) -> list[Path]:
    """The folders that hold a checkout's ``alise`` package: ``src/``, or ``clients/`` and
    ``services/`` in a tree from before the single source root."""
    root = Path(checkout)
    return [root / "src"] if (root / "src" / "alise").is_dir() else [root / "clients", root / "services"]


def pythonpath(checkout: str | Path) -> str:
    """The PYTHONPATH that runs that checkout's ALISE with this interpreter and its packages."""
    return ":".join(str(p) for p in source_roots(checkout))


def package_file(checkout: str | Path, relative: str) -> Path:
    """A module of that checkout's ``alise`` package, e.g. ``scheduler/main.py``."""
    for root in source_roots(checkout):
        if (root / "alise" / relative).exists():
            return root / "alise" / relative
    raise FileNotFoundError(f"{checkout}: no alise/{relative}")
