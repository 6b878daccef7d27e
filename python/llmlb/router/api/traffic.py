"""A short in-memory traffic history for the dashboard, sampled from the proxy's own counters.

Every ``interval_s`` each worker reads the inference proxy's Prometheus counters
(``llmlb_proxy_requests_total``, ``_errors_total``, ``_rejected_total`` and the
``_ttfb_seconds`` histogram; merged across workers when they share
``PROMETHEUS_MULTIPROC_DIR``) and keeps what changed since the last read, for
``window_s``. Sampling the counters rather than hooking the hot path costs a proxied request
nothing, and every worker shows the whole router's traffic, not only its own.

Prefix-aware routing is summarised over the same window from ``llmlb_proxy_routing_total``
(why nodes were chosen, per model) and ``llmlb_proxy_prompt_chars_total`` /
``_predicted_cached_chars_total`` (per node and model: the share of prompt characters the
index predicted the node's cache held).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import CollectorRegistry

from llmlb import config
from llmlb.router.proxy.balancer import Balancer
from llmlb.router.proxy.prefix_index import PrefixIndex

logger = logging.getLogger("llmlb.router")

INTERVAL_S = 2.0
WINDOW_S = 600.0

_REQUESTS = "llmlb_proxy_requests_total"
_ERRORS = "llmlb_proxy_errors_total"
_REJECTED = "llmlb_proxy_rejected_total"
_TTFB = "llmlb_proxy_ttfb_seconds_bucket"
_ROUTING = "llmlb_proxy_routing_total"
_PROMPT_CHARS = "llmlb_proxy_prompt_chars_total"
_CACHED_CHARS = "llmlb_proxy_predicted_cached_chars_total"
_REPORTED_PROMPT = "llmlb_proxy_reported_prompt_tokens_total"
_REPORTED_CACHED = "llmlb_proxy_reported_cached_tokens_total"
# Position of each prompt counter in a snapshot's ``chars`` entry.
_PROMPT_SERIES = {_PROMPT_CHARS: 0, _CACHED_CHARS: 1, _REPORTED_PROMPT: 2, _REPORTED_CACHED: 3}
_SAMPLES = frozenset({_REQUESTS, _ERRORS, _REJECTED, _TTFB, _ROUTING, *_PROMPT_SERIES})
# A client that hangs up is not a failure of the router or the node.
_NOT_ERRORS = frozenset({"client_gone"})

Key = tuple[str, str]  # (node, model)


@dataclass(slots=True)
class Counts:
    """Counters of one (node, model) pair: cumulative in a snapshot, differences in an
    interval. ``ttfb`` maps a histogram bucket's upper bound to its cumulative count."""

    requests: float = 0.0
    errors: float = 0.0
    ttfb: dict[float, float] = field(default_factory=dict)

    def minus(self, earlier: Counts | None) -> Counts:
        """What happened since ``earlier``; everything when a counter went backwards (reset)."""
        if earlier is None:
            return self
        diff = Counts(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            {le: n - earlier.ttfb.get(le, 0.0) for le, n in self.ttfb.items()},
        )
        if diff.requests < 0 or diff.errors < 0 or any(n < 0 for n in diff.ttfb.values()):
            return self
        return diff

    def add(self, other: Counts) -> None:
        """Accumulate ``other`` into this one."""
        self.requests += other.requests
        self.errors += other.errors
        for le, n in other.ttfb.items():
            self.ttfb[le] = self.ttfb.get(le, 0.0) + n

    def empty(self) -> bool:
        """Nothing counted."""
        return not self.requests and not self.errors and not any(self.ttfb.values())


@dataclass(slots=True)
class Snapshot:
    """The proxy's counters at one moment (``routing``: decisions by (model, reason);
    ``chars``: by (node, model), prompt characters, the index's predicted cached characters,
    and the prompt and cached tokens the node reported)."""

    pairs: dict[Key, Counts] = field(default_factory=dict)
    rejected: float = 0.0
    routing: dict[Key, float] = field(default_factory=dict)
    chars: dict[Key, list[float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Point:
    """One interval of one series: answers, errors and TTFB quantiles (``None``: no answer)."""

    requests: int
    errors: int
    ttfb_p50_s: float | None
    ttfb_p95_s: float | None

    @classmethod
    def of(cls, counts: Counts) -> Point:
        """Summarise ``counts``."""
        p50, p95 = quantile(0.5, counts.ttfb), quantile(0.95, counts.ttfb)
        return cls(
            round(counts.requests),
            round(counts.errors),
            None if p50 is None else round(p50, 6),
            None if p95 is None else round(p95, 6),
        )


_IDLE = Point(0, 0, None, None)


@dataclass(frozen=True, slots=True)
class Interval:
    """One interval ending at ``end`` (unix seconds), summarised in total, per model and per
    node when it is recorded, so reading the history costs no aggregation."""

    end: float
    total: Point
    rejected: int
    models: dict[str, Point]
    nodes: dict[str, Point]

    @classmethod
    def of(cls, end: float, pairs: dict[Key, Counts], rejected: float) -> Interval:
        """Group the (node, model) differences of one interval."""
        overall = Counts(errors=rejected)
        by_model: dict[str, Counts] = {}
        by_node: dict[str, Counts] = {}
        for (node, model), counts in pairs.items():
            overall.add(counts)
            if model:
                by_model.setdefault(model, Counts()).add(counts)
            if node:  # a request cut short before any node was tried has none
                by_node.setdefault(node, Counts()).add(counts)
        return cls(
            end,
            Point.of(overall),
            round(rejected),
            {name: Point.of(counts) for name, counts in by_model.items()},
            {name: Point.of(counts) for name, counts in by_node.items()},
        )


def parse_samples(samples: Iterable[Any]) -> Snapshot:
    """Fold Prometheus samples (``name``, ``labels``, ``value``) into a :class:`Snapshot`.

    A node's answer with a status of 400 or more counts as an error, as does every failed
    attempt (``llmlb_proxy_errors_total``) but a client hanging up.
    """
    snap = Snapshot()
    for sample in samples:
        name, labels, value = sample.name, sample.labels, sample.value
        if name not in _SAMPLES:
            continue
        if name == _REJECTED:
            snap.rejected += value
            continue
        if name == _ROUTING:
            pair = (labels.get("model", ""), labels.get("reason", ""))
            snap.routing[pair] = snap.routing.get(pair, 0.0) + value
            continue
        series = _PROMPT_SERIES.get(name)
        if series is not None:
            pair = (labels.get("node", ""), labels.get("model", ""))
            snap.chars.setdefault(pair, [0.0, 0.0, 0.0, 0.0])[series] += value
            continue
        key = (labels.get("node", ""), labels.get("model", ""))
        counts = snap.pairs.get(key)
        if counts is None:
            counts = snap.pairs[key] = Counts()
        if name == _REQUESTS:
            counts.requests += value
            if labels.get("code", "").isdigit() and int(labels["code"]) >= 400:
                counts.errors += value
        elif name == _ERRORS:
            if labels.get("kind") not in _NOT_ERRORS:
                counts.errors += value
        else:
            le = float(labels.get("le", "inf"))
            counts.ttfb[le] = counts.ttfb.get(le, 0.0) + value
    return snap


def read_counters() -> Snapshot:
    """The proxy's counters now: this process's, or every worker's in multiprocess mode."""
    directory = config.prometheus_multiproc_dir()
    if directory is None:
        families = REGISTRY.restricted_registry(sorted(_SAMPLES)).collect()
    else:
        families = MultiProcessCollector(CollectorRegistry(), path=str(directory)).collect()
    return parse_samples(sample for family in families for sample in family.samples)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram (``{upper bound: count}``), interpolated
    linearly inside its bucket as Prometheus' ``histogram_quantile`` does; ``None`` if empty."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _series(points: list[Point]) -> dict[str, list]:
    return {
        "requests": [point.requests for point in points],
        "errors": [point.errors for point in points],
        "ttfb_p50_s": [point.ttfb_p50_s for point in points],
        "ttfb_p95_s": [point.ttfb_p95_s for point in points],
    }


def _grouped(intervals: list[Interval], group: str) -> dict[str, dict[str, list]]:
    names = sorted({name for interval in intervals for name in getattr(interval, group)})
    return {
        name: _series([getattr(interval, group).get(name, _IDLE) for interval in intervals])
        for name in names
    }


class TrafficHistory:
    """The last ``window_s`` of proxied traffic, in intervals of ``interval_s``.

    Args:
        balancer: this worker's balancer, whose per-node state (cooled down, requests in
            flight) is reported alongside the history.
        read: where the counters come from (:func:`read_counters`).
        clock: unix time.
        index: this worker's prefix index (keys held per node, shown with the routing).
    """

    def __init__(
        self,
        balancer: Balancer | None = None,
        *,
        interval_s: float = INTERVAL_S,
        window_s: float = WINDOW_S,
        read: Callable[[], Snapshot] = read_counters,
        clock: Callable[[], float] = time.time,
        index: PrefixIndex | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self._balancer = balancer
        self._index = index
        self._read = read
        self._clock = clock
        self._last: Snapshot | None = None
        self._intervals: deque[Interval] = deque(maxlen=max(1, round(window_s / interval_s)))
        # The snapshots bounding the window (routing is summed over it, not per interval).
        self._bounds: deque[Snapshot] = deque(maxlen=(self._intervals.maxlen or 1) + 1)
        self._task: asyncio.Task | None = None
        self._cached: dict | None = None

    def record(self, snapshot: Snapshot, now: float | None = None) -> None:
        """Keep what moved since the previous snapshot (the first one is only a baseline)."""
        now = self._clock() if now is None else now
        last, self._last = self._last, snapshot
        self._bounds.append(snapshot)
        if last is None:
            return
        pairs = {}
        for key, counts in snapshot.pairs.items():
            diff = counts.minus(last.pairs.get(key))
            if not diff.empty():
                pairs[key] = diff
        rejected = snapshot.rejected - last.rejected
        self._intervals.append(Interval.of(now, pairs, rejected if rejected >= 0 else 0.0))
        self._cached = None

    def sample(self) -> None:
        """Read the counters now and record them."""
        self.record(self._read())

    def to_dict(self) -> dict:
        """``GET /v0/traffic``: one entry per interval, oldest first, in aligned arrays.

        ``total``, each ``models[id]`` and each ``nodes[id]`` hold ``requests`` and ``errors``
        (counts per interval; divide by ``interval_s`` for a rate) and ``ttfb_p50_s`` /
        ``ttfb_p95_s`` (``null`` where nothing was answered). ``total.rejected`` counts the
        requests the router answered itself (no model or node to pin them on), also included
        in ``total.errors``. ``balancer`` is the answering worker's view of each node, and
        ``worker`` its process id. ``routing`` sums the window: ``models[id]`` the nodes
        chosen by reason (prefix, load, affinity, fallback), ``nodes[id][model]`` the prompt
        characters the node answered and how many the index predicted its cache held, and
        ``index[id]`` the keys the answering worker's index holds for the node.
        """
        if self._cached is None:  # built once per interval, however many pages poll
            intervals = list(self._intervals)
            total = _series([interval.total for interval in intervals])
            total["rejected"] = [interval.rejected for interval in intervals]
            self._cached = {
                "interval_s": self.interval_s,
                "window_s": self.window_s,
                "t": [round(interval.end, 3) for interval in intervals],
                "total": total,
                "models": _grouped(intervals, "models"),
                "nodes": _grouped(intervals, "nodes"),
                "routing": self._routing(),
            }
        data = {**self._cached, "balancer": self._balancer_state(), "worker": os.getpid()}
        if self._index is not None:
            data["routing"] = {**data["routing"], "index": self._index.stats()}
        return data

    def _routing(self) -> dict[str, dict]:
        """Routing decisions, predicted cache hits and the nodes' reported ones over the
        window."""
        models: dict[str, dict[str, int]] = {}
        nodes: dict[str, dict[str, dict[str, int]]] = {}
        if len(self._bounds) >= 2:
            first, last = self._bounds[0], self._bounds[-1]
            for (model, reason), value in last.routing.items():
                diff = value - first.routing.get((model, reason), 0.0)
                count = round(diff if diff >= 0 else value)
                if count:
                    models.setdefault(model, {})[reason] = count
            for (node, model), now in last.chars.items():
                before = first.chars.get((node, model), [0.0, 0.0, 0.0, 0.0])
                if any(a < b for a, b in zip(now, before, strict=True)):  # a counter reset
                    before = [0.0, 0.0, 0.0, 0.0]
                prompt, predicted, reported, reported_cached = (
                    round(a - b) for a, b in zip(now, before, strict=True)
                )
                if prompt > 0:
                    nodes.setdefault(node, {})[model] = {
                        "prompt_chars": prompt,
                        "predicted_cached_chars": predicted,
                        "reported_prompt_tokens": reported,
                        "reported_cached_tokens": reported_cached,
                    }
        return {"models": models, "nodes": nodes}

    def _balancer_state(self) -> dict[str, dict]:
        if self._balancer is None:
            return {}
        return {
            state.node_id: {"cooled_down": not state.healthy, "outstanding": state.outstanding}
            for state in list(self._balancer.nodes.values())
        }

    async def start(self) -> None:
        """Take the baseline and start sampling every ``interval_s``."""
        if self._task is None:
            self.record(await asyncio.to_thread(self._read))
            self._task = asyncio.create_task(self._run(), name="llmlb-traffic")

    async def close(self) -> None:
        """Stop sampling."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.record(await asyncio.to_thread(self._read))
            except Exception:  # a torn metrics file must not end the history
                logger.exception("cannot sample the proxy's counters")


__all__ = [
    "Counts",
    "Interval",
    "Point",
    "Snapshot",
    "TrafficHistory",
    "parse_samples",
    "quantile",
    "read_counters",
]
