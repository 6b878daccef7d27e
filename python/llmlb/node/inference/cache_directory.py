"""Which prefix keys (:mod:`llmlb.prefix_keys`) this node's caches hold, and what changed.

Every holder of prompt cells (a slot of a model, an entry of its RAM prompt cache) holds the
keys of the request whose prompt it holds, plus the key of the answer it generated. A key
is held while any holder holds it; the directory records keys that became held (stored) or
stopped being held (removed) since the last :meth:`CacheDirectory.take_changes`, which the
node's cache reporter sends to the routers. Decode threads write, the event loop reads: one
lock, and a callback when something changed.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable
from contextvars import ContextVar

from llmlb.prefix_keys import PrefixKeys

__all__ = ["CacheDirectory", "request_origin"]

request_origin: ContextVar[tuple[str, PrefixKeys] | None] = ContextVar(
    "request_origin", default=None
)
"""The route a request arrived on and the prefix keys of its body as the client sent it (set
by the node's route handler): the keys of the client's own dialect, as the router computes
them, whatever the dialect module hands the engine."""


class CacheDirectory:
    """Keys held per model, by holder.

    Args:
        on_change: called (from any thread) after a change; it must be cheap and
            thread-safe (e.g. ``loop.call_soon_threadsafe(event.set)``).
    """

    def __init__(self, on_change: Callable[[], object] | None = None):
        self._lock = threading.Lock()
        self._holders: dict[Hashable, tuple[str, frozenset[int]]] = {}
        self._counts: dict[str, Counter[int]] = defaultdict(Counter)
        self._stored: dict[str, set[int]] = defaultdict(set)
        self._removed: dict[str, set[int]] = defaultdict(set)
        self.on_change = on_change or (lambda: None)

    def hold(self, holder: Hashable, model: str, keys: Iterable[int]) -> None:
        """``holder`` now holds exactly ``keys`` of ``model`` (none: it holds nothing)."""
        keys = frozenset(keys)
        with self._lock:
            self._release(holder)
            if keys:
                self._holders[holder] = (model, keys)
                self._count(model, keys, +1)
        self.on_change()

    def add(self, holder: Hashable, model: str, keys: Iterable[int]) -> None:
        """``holder`` also holds ``keys`` of ``model``."""
        with self._lock:
            old = self._holders.get(holder, (model, frozenset()))[1]
            new = frozenset(keys) - old
            if not new:
                return
            self._holders[holder] = (model, old | new)
            self._count(model, new, +1)
        self.on_change()

    def copy(self, source: Hashable, target: Hashable) -> None:
        """``target`` holds what ``source`` holds (a slot saved into the RAM cache)."""
        with self._lock:
            held = self._holders.get(source)
        if held is not None:
            self.hold(target, *held)

    def drop(self, holder: Hashable) -> None:
        """``holder`` holds nothing any more."""
        with self._lock:
            if not self._release(holder):
                return
        self.on_change()

    def drop_model(self, model: str) -> None:
        """Nothing of ``model`` is held any more (it was unloaded)."""
        with self._lock:
            gone = [h for h, (m, _) in self._holders.items() if m == model]
            for holder in gone:
                self._release(holder)
        if gone:
            self.on_change()

    def take_changes(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """``(stored, removed)`` per model since the last call (a key both stored and removed
        in between appears in neither)."""
        with self._lock:
            stored = {m: sorted(k) for m, k in self._stored.items() if k}
            removed = {m: sorted(k) for m, k in self._removed.items() if k}
            self._stored.clear()
            self._removed.clear()
        return stored, removed

    def snapshot(self, limit: int) -> dict[str, list[int]]:
        """Every key held now, per model, at most ``limit`` in all (pending changes stay
        pending: other readers may still need them as changes)."""
        with self._lock:
            out: dict[str, list[int]] = {}
            left = limit
            for model, counts in self._counts.items():
                keys = list(counts)[:left]
                if keys:
                    out[model] = keys
                    left -= len(keys)
            return out

    def held(self, model: str) -> set[int]:
        """Keys of ``model`` held now (for tests and status)."""
        with self._lock:
            return set(self._counts.get(model, ()))

    def _release(self, holder: Hashable) -> bool:
        held = self._holders.pop(holder, None)
        if held is None:
            return False
        self._count(*held, -1)
        return True

    def _count(self, model: str, keys: frozenset[int], step: int) -> None:
        counts = self._counts[model]
        for key in keys:
            before = counts[key]
            after = before + step
            if after <= 0:
                del counts[key]
                if key in self._stored[model]:
                    self._stored[model].discard(key)
                else:
                    self._removed[model].add(key)
            else:
                counts[key] = after
                if before == 0:
                    if key in self._removed[model]:
                        self._removed[model].discard(key)
                    else:
                        self._stored[model].add(key)
