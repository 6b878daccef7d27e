"""Incremental detokenisation: whole UTF-8 characters only, stop strings across tokens.

Text is released as soon as it can no longer be part of a stop string; a stop string
that spans several tokens is found all the same and cut, with everything after it.
"""

from __future__ import annotations

import codecs


class TextStream:
    """Turns token pieces (bytes) into text deltas, honouring ``stop`` strings.

    Args:
        stop: strings that end the generation; none of them is ever emitted.
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; the text that is now safe to emit (maybe ``""``).

        After a stop string is seen, :attr:`stopped` is true and nothing more is emitted.
        """
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        cut = min(
            (i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        safe = len(self._pending) - self._unsafe_tail()
        out, self._pending = self._pending[:safe], self._pending[safe:]
        return out

    def _unsafe_tail(self) -> int:
        """Length of the longest suffix of the pending text that starts some stop string."""
        text = self._pending
        for size in range(min(self._hold, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def flush(self) -> str:
        """The held-back text at the end of the generation (never part of a stop string)."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
