"""A progress line on stderr for the tools that run for minutes (`alise bench`, `alise sim`).

Three modes, picked by ``--progress/--no-progress`` (``ProgressLine.for_flag``):

* live (stderr is a terminal, or ``--progress``): one line rewritten in place (carriage return,
  erase to the end of the line), at most once per ``min_interval_s``, cut to the terminal's width
  so that it never wraps (a wrapped line cannot be rewritten); and a line per finished phase;
* phases (stderr is not a terminal: CI logs, pipes): only the line per finished phase;
* off (``--no-progress``): nothing.

A finished phase's line and the live line never mix: the live line is erased first, and the
next update draws it again below. Whoever prints to stdout on the same terminal calls
:meth:`ProgressLine.clear` first.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

ERASE = "\r\x1b[K"


class ProgressLine:
    def __init__(self, stream: TextIO, *, live: bool, phases: bool = True,
                 min_interval_s: float = 0.25, clock=time.monotonic) -> None:
        self.stream = stream
        self.is_live = live
        self.has_phases = phases
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._last_draw = -float("inf")
        self._drawn = False

    @classmethod
    def for_flag(cls, flag: bool | None, stream: TextIO | None = None) -> ProgressLine:
        """``flag``: True (``--progress``) live; False (``--no-progress``) off; None: live on a
        terminal, else phase lines only."""
        stream = stream if stream is not None else sys.stderr
        if flag is False:
            return cls(stream, live=False, phases=False)
        return cls(stream, live=flag is True or _is_terminal(stream))

    def update(self, text: str) -> None:
        """Redraws the live line, unless it was drawn less than ``min_interval_s`` ago."""
        if not self.is_live:
            return
        now = self.clock()
        if now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        self.stream.write(ERASE + text[:max(_width(self.stream) - 1, 20)])
        self.stream.flush()
        self._drawn = True

    def phase(self, text: str) -> None:
        """One line for a finished phase (kept on screen and in logs)."""
        if not self.has_phases:
            return
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erases the live line (before anything else is printed on the terminal); the next
        update draws it again at once."""
        if self._drawn:
            self.stream.write(ERASE)
            self.stream.flush()
            self._drawn = False
        self._last_draw = -float("inf")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _width(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # not a terminal: a forced --progress to a pipe
        columns = 0
    return columns or 160  # 0: a terminal that does not say
