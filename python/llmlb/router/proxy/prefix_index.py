"""Which node holds which prompt prefix: the router's index of the nodes' prompt caches.

Per model, each prefix key (:mod:`llmlb.prefix_keys`) maps to the nodes that hold it, as a
bit mask of small per-node numbers; per node and model the keys are kept in the order they
were stored, at most ``max_node_keys`` of them (beyond it the oldest go).

Two sources fill it:

- **Reports** (``POST /v0/nodes/{id}/cache``, :class:`llmlb.prefix_keys.CacheReport`): what
  the node's slots and RAM cache gained and lost. A snapshot replaces what was known of the
  node; a delta must continue its epoch's ``seq`` (a duplicate is ignored); a new epoch or a
  gap makes the index forget the node and ask for a snapshot (:data:`RESYNC`).
- **Routing** (:meth:`PrefixIndex.learn`): after a request was sent to a node, its keys are
  assumed held there, so a conversation's next turn finds the node before its report comes.
  On a node that reports, such a guess that no report confirms within ``guess_ttl_s`` is
  dropped again; on a node that never reported, guesses are all there is and stay until the
  bound pushes them out.

Nothing here touches the database or the network: every router keeps its own index from the
reports every node sends it. Memory: about 250 bytes per (node, model, key).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmlb.prefix_keys import MAX_NODE_KEYS, CacheReport, PrefixKeys

__all__ = ["GUESS_TTL_S", "MAX_NODE_MODELS", "MAX_REPORT_BYTES", "PrefixIndex", "ReportResult"]

# An unconfirmed guess about a node that reports its cache lives this long (its report comes
# within 100 ms of the change; a guess still unconfirmed after this was wrong).
GUESS_TTL_S = 10.0
# Models whose keys one node may hold in the index (more are ignored).
MAX_NODE_MODELS = 64
# Largest cache report body the router reads (413 beyond): MAX_REPORT_KEYS keys of up to
# 11 characters each, with room for model ids.
MAX_REPORT_BYTES = 512 * 1024


class ReportResult(enum.Enum):
    """What :meth:`PrefixIndex.apply` made of a report."""

    OK = "ok"  # applied (or a duplicate, ignored)
    RESYNC = "resync"  # the node's keys are forgotten: it must send a snapshot


@dataclass(slots=True, eq=False)
class _Node:
    """What the index knows of one node."""

    mask: int  # this node's bit
    models: dict[str, dict[int, None]] = field(default_factory=dict)  # oldest key first
    epoch: str | None = None  # of the last report applied (None: never reported)
    seq: int = 0
    # Guesses from routing not yet confirmed by a report (reporting nodes only): expiry by
    # (model, key), oldest first.
    guesses: dict[tuple[str, int], float] = field(default_factory=dict)

    def size(self) -> int:
        return sum(len(keys) for keys in self.models.values())


class PrefixIndex:
    """Per model, prefix key -> the nodes holding it.

    Args:
        max_node_keys: keys kept per node and model (the oldest go beyond it).
        max_node_models: models one node may hold keys of.
        guess_ttl_s: life of an unconfirmed guess on a node that reports its cache.
        clock: monotonic clock (tests inject one).
    """

    def __init__(
        self,
        *,
        max_node_keys: int = MAX_NODE_KEYS,
        max_node_models: int = MAX_NODE_MODELS,
        guess_ttl_s: float = GUESS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_node_keys = max(1, max_node_keys)
        self.max_node_models = max(1, max_node_models)
        self.guess_ttl_s = guess_ttl_s
        self._clock = clock
        self._nodes: dict[str, _Node] = {}
        self._owners: dict[str, dict[int, int]] = {}  # model -> key -> mask of nodes
        self._free: list[int] = []  # bits of forgotten nodes, for reuse
        self._next_bit = 0
        self._forgotten: dict[str, int] = {}  # times each node id was forgotten

    # -- the hot path ----------------------------------------------------------------------

    def longest(self, model: str, keys: PrefixKeys, node_ids: Iterable[str]) -> dict[str, int]:
        """For each of ``node_ids`` holding some of ``keys`` (a request's chain), the prompt
        characters covered by the deepest key it holds; nodes holding none are left out.

        Walks the chain from its deepest key down and stops as soon as every candidate is
        placed.
        """
        owners = self._owners.get(model)
        if not owners or not keys:
            return {}
        nodes = self._nodes
        want = 0
        candidates: list[tuple[str, _Node]] = []
        now = 0.0
        for node_id in node_ids:
            node = nodes.get(node_id)
            if node is None:
                continue
            if node.guesses:
                now = now or self._clock()
                if next(iter(node.guesses.values())) <= now:
                    self._expire(node, now)
            want |= node.mask
            candidates.append((node_id, node))
        found: dict[str, int] = {}
        if not want:
            return found
        get = owners.get
        for index in range(len(keys) - 1, -1, -1):
            key, chars = keys[index]
            held = get(key)
            if held is not None and held & want:
                hit = held & want
                want ^= hit
                for node_id, node in candidates:
                    if node.mask & hit:
                        found[node_id] = chars
                if not want:
                    break
        return found

    def generation(self, node_id: str) -> int:
        """How many times ``node_id`` was forgotten: pass it to :meth:`learn` from before the
        request was sent, so an answer that outlived its node's restart teaches nothing."""
        return self._forgotten.get(node_id, 0)

    def learn(
        self, node_id: str, model: str, keys: PrefixKeys, generation: int | None = None
    ) -> None:
        """``keys`` were just sent to ``node_id``: assume it holds them now (a guess that the
        node's reports confirm, or undo); nothing when the node was forgotten since
        ``generation``."""
        if not keys:
            return
        if generation is not None and generation != self._forgotten.get(node_id, 0):
            return
        node = self._node(node_id)
        held = self._held(node, model)
        if held is None:
            return
        reporting = node.epoch is not None
        if reporting:
            now = self._clock()
            if node.guesses:
                self._expire(node, now)
            expires = now + self.guess_ttl_s
            guesses = node.guesses
            for key, _ in keys:
                if key not in held:
                    self._add(node, model, held, key)
                    guesses.pop((model, key), None)  # keep the oldest first
                    guesses[(model, key)] = expires
        else:  # approximate mode: what was routed here last is kept longest
            for key, _ in keys:
                if key in held:
                    del held[key]
                    held[key] = None
                else:
                    self._add(node, model, held, key)

    # -- reports ---------------------------------------------------------------------------

    def apply(self, node_id: str, report: CacheReport) -> ReportResult:
        """Apply a node's cache report (see :class:`llmlb.prefix_keys.CacheReport`).

        A snapshot replaces what the index knew of the node, whatever its ``seq``. A delta of
        the node's current epoch applies when its ``seq`` is the next one (removed keys
        first, then stored ones), is ignored when it is not newer; a delta of another epoch
        (the node restarted, or this router never heard from it) or after a gap makes the
        index forget the node's keys (unless it never reported: then only its guesses from
        routing were known, and they stay) and returns :attr:`ReportResult.RESYNC`.
        """
        node = self._nodes.get(node_id)
        if report.snapshot:
            if node is None:
                node = self._node(node_id)
            else:
                self._clear(node)
            node.epoch, node.seq = report.epoch, report.seq
            for model, keys in report.stored.items():
                held = self._held(node, model) if keys else None
                if held is not None:
                    for key in keys:
                        self._store(node, model, held, key)
            return ReportResult.OK
        if node is None or node.epoch != report.epoch:
            if node is not None and node.epoch is not None:
                self.forget(node_id)  # a new epoch: the node restarted, its caches are new
            return ReportResult.RESYNC
        if report.seq <= node.seq:
            return ReportResult.OK  # a duplicate (a retried post)
        if report.seq != node.seq + 1:
            self.forget(node_id)
            return ReportResult.RESYNC
        guesses = node.guesses
        for model, keys in report.removed.items():
            held = node.models.get(model)
            if held is None:
                continue
            for key in keys:
                if key in held:
                    self._remove(node, model, held, key)
                    if guesses:
                        guesses.pop((model, key), None)
        for model, keys in report.stored.items():
            held = self._held(node, model) if keys else None
            if held is not None:
                for key in keys:
                    self._store(node, model, held, key)
        node.seq = report.seq
        return ReportResult.OK

    def forget(self, node_id: str) -> None:
        """Drop everything known of ``node_id`` (it went offline, was removed, or restarted);
        its next delta gets :attr:`ReportResult.RESYNC`."""
        node = self._nodes.pop(node_id, None)
        if node is None:
            return
        self._forgotten[node_id] = self._forgotten.get(node_id, 0) + 1
        self._clear(node)
        self._free.append(node.mask)

    # -- introspection ---------------------------------------------------------------------

    def keys_held(self, node_id: str, model: str | None = None) -> int:
        """How many keys ``node_id`` holds (of ``model``, or of every model)."""
        node = self._nodes.get(node_id)
        if node is None:
            return 0
        if model is not None:
            return len(node.models.get(model, ()))
        return node.size()

    def stats(self) -> dict[str, dict]:
        """Per node: keys held, and the epoch and ``seq`` of its last report (``None``: it
        never reported; its keys are guesses from routing)."""
        return {
            node_id: {"keys": node.size(), "epoch": node.epoch, "seq": node.seq}
            for node_id, node in list(self._nodes.items())
        }

    # -- internals -------------------------------------------------------------------------

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            if self._free:
                mask = self._free.pop()
            else:
                mask = 1 << self._next_bit
                self._next_bit += 1
            node = self._nodes[node_id] = _Node(mask)
        return node

    def _held(self, node: _Node, model: str) -> dict[int, None] | None:
        held = node.models.get(model)
        if held is None:
            if len(node.models) >= self.max_node_models:
                return None
            held = node.models[model] = {}
        return held

    def _store(self, node: _Node, model: str, held: dict[int, None], key: int) -> None:
        """A reported key: held (newest), and no longer a guess."""
        if key in held:
            del held[key]
            held[key] = None
        else:
            self._add(node, model, held, key)
        if node.guesses:
            node.guesses.pop((model, key), None)

    def _add(self, node: _Node, model: str, held: dict[int, None], key: int) -> None:
        held[key] = None
        owners = self._owners.get(model)
        if owners is None:
            owners = self._owners[model] = {}
        owners[key] = owners.get(key, 0) | node.mask
        if len(held) > self.max_node_keys:
            oldest = next(iter(held))
            self._remove(node, model, held, oldest)

    def _remove(self, node: _Node, model: str, held: dict[int, None], key: int) -> None:
        del held[key]
        owners = self._owners.get(model)
        if owners is None:
            return
        _keep_owners(owners, key, ~node.mask)
        if not owners:
            del self._owners[model]

    def _clear(self, node: _Node) -> None:
        """Drop every key of ``node`` (its bit stays its own)."""
        clear = ~node.mask
        for model, held in node.models.items():
            owners = self._owners.get(model)
            if owners is None:
                continue
            for key in held:
                _keep_owners(owners, key, clear)
            if not owners:
                del self._owners[model]
        node.models = {}
        node.guesses = {}
        node.epoch, node.seq = None, 0

    def _expire(self, node: _Node, now: float) -> None:
        """Drop the guesses on ``node`` whose time is up (oldest first)."""
        guesses = node.guesses
        while guesses:
            (model, key), expires = next(iter(guesses.items()))
            if expires > now:
                return
            del guesses[(model, key)]
            held = node.models.get(model)
            if held is not None and key in held:
                self._remove(node, model, held, key)


def _keep_owners(owners: dict[int, int], key: int, keep: int) -> None:
    """Keep only the ``keep`` bits of ``key``'s owner mask; forget the key when none is left."""
    mask = owners.get(key, 0) & keep
    if mask:
        owners[key] = mask
    else:
        owners.pop(key, None)
