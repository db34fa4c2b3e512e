"""Stop strings, honoured in the text the client sees.

The scheduler stops on token ids only; a stop *string* can span several tokens and deltas.
``StopStrings.feed`` therefore holds back the tail of the text that could still become a stop
string, and releases it once it cannot. Invariant: no character of a matched stop string, nor
anything after it, is ever released; a held-back tail that never completes a match is released
by ``flush`` at the end of the stream.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.pending = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Text safe to release after ``text`` arrives; sets ``matched`` on a stop string."""
        if not self.stops:
            return text
        if self.matched:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.matched = True
            released, self.pending = self.pending[:cut], ""
            return released
        keep = self._partial_tail()
        released = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return released

    def _partial_tail(self) -> int:
        """Length of the longest suffix of ``pending`` that is a proper prefix of a stop string."""
        text = self.pending
        for n in range(min(len(text), self.max_len - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        released, self.pending = ("" if self.matched else self.pending), ""
        return released
