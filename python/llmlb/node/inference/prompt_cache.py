"""Prompt states kept in host RAM after their slot was taken for something else.

When a slot is about to be reused for a prompt that does not continue what it holds, the
scheduler copies the slot's state (its KV cells, ``llama_state_seq_get_data``) here first,
as llama.cpp's server does with ``--cache-ram``. A later prompt that shares a longer prefix
with an entry than with any free slot gets that state restored into its slot
(``llama_state_seq_set_data``) and evaluates only the rest. Entries are evicted least
recently used first within a byte limit; prompts shorter than ``min_tokens`` are not kept.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CachedPrompt", "PromptCache", "common_prefix"]


@dataclass(eq=False)
class CachedPrompt:
    """One saved sequence.

    Attributes:
        tokens: the tokens whose cells ``state`` holds.
        state: the bytes ``llama_state_seq_get_data`` wrote.
        pos_min: the first position the state still holds (sliding-window models drop cells
            beyond their window: a prefix shorter than ``pos_min + n_swa`` cannot be reused).
    """

    tokens: list[int]
    state: np.ndarray
    pos_min: int
    last_used: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        """Bytes this entry holds."""
        return int(self.state.nbytes) + 8 * len(self.tokens)


class PromptCache:
    """A byte-bounded LRU of :class:`CachedPrompt` (one per model; used by its decode thread).

    Args:
        limit_bytes: the most the entries may hold together (0: the cache is off).
        min_tokens: shorter prompts are not worth keeping.

    Attributes:
        on_drop: called with each entry that leaves (evicted, or replaced by a longer one).
    """

    def __init__(self, limit_bytes: int, min_tokens: int = 32):
        self.limit_bytes = limit_bytes
        self.min_tokens = min_tokens
        self.on_drop: Callable[[CachedPrompt], object] = lambda _entry: None
        self._entries: OrderedDict[int, CachedPrompt] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def worth_keeping(self, tokens: list[int]) -> bool:
        """Whether a sequence holding ``tokens`` should be saved before it is overwritten."""
        if self.limit_bytes <= 0 or len(tokens) < self.min_tokens:
            return False
        # already saved, or a longer entry holds all of it
        return not any(common_prefix(e.tokens, tokens) == len(tokens) for e in self._values())

    def put(self, entry: CachedPrompt) -> bool:
        """Keep ``entry``; drop entries it extends, then the least recently used over the
        limit. ``False`` when it is larger than the whole cache (not kept)."""
        if entry.size > self.limit_bytes:
            return False
        for key, old in list(self._entries.items()):
            if common_prefix(old.tokens, entry.tokens) == len(old.tokens):
                self._drop(key)
        self._entries[id(entry)] = entry
        self.bytes += entry.size
        while self.bytes > self.limit_bytes and self._entries:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        return True

    def best(self, prompt: list[int], n_swa: int) -> tuple[CachedPrompt | None, int]:
        """The entry sharing the longest usable prefix with ``prompt``, and that length."""
        best, best_len = None, 0
        for entry in self._values():
            n = common_prefix(entry.tokens, prompt)
            if n_swa > 0 and entry.pos_min > max(0, n - n_swa):
                continue  # the window's cells that prefix needs were dropped
            if n > best_len:
                best, best_len = entry, n
        if best is not None:
            best.last_used = time.monotonic()
            self._entries.move_to_end(id(best))
        return best, best_len

    def clear(self) -> None:
        """Drop every entry."""
        for key in list(self._entries):
            self._drop(key)

    def _values(self) -> list[CachedPrompt]:
        return list(self._entries.values())

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        self.on_drop(entry)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
