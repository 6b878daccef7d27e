"""Choosing a node for one request: one cost for the prefill still to do and the node's load
(prefix policy), else least outstanding per slot among two random choices; affinity.

The balancer keeps, per node, the requests this router process has in flight there and the
node's recent failures. It knows nothing about HTTP: the proxy asks it for a node among the
ones the fleet reports ready, tells it how each attempt ended, and probes cooled-down nodes.
:class:`~.poison.PoisonLog` remembers the requests that nodes lost or timed out on while
holding them, so that one that did so twice is never handed to a node again; requests that
find no free slot wait in :class:`~.wait_queue.WaitQueue`.

Prefix policy (``--routing prefix``, the default): given a request's prefix keys, the
:class:`~llmlb.router.proxy.prefix_index.PrefixIndex` says how much of its prompt each node holds,
and every usable node (healthy, fewer requests in flight than slots) costs

    cost = (prompt_chars - cached_chars) / CHARS_PER_TOKEN + LOAD_WEIGHT_TOKENS * load

(``load``: the requests this router has in flight there). The cheapest wins; ties go to the
``user``/``X-Session-Id`` affinity, then to two random choices (which also weigh what the
node last reported of other routers' requests). The count a node reports in its heartbeats
is left out of the cost: it reaches the router seconds late, and it would count the turn a
node just finished against the very node that holds that conversation. With several routers
each one's own count is a fair sample of a node's load (clients spread over the routers).
A holder at its slot count is not usable, so a hot prefix spills to the least costly other
node, which then builds its own copy. When no node holds any of the prompt, or
the request has no keys, the choice is the plain two-random-choices rule (``--routing p2c``
always uses it).
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from llmlb.prefix_keys import PrefixKeys
from llmlb.router.proxy.prefix_index import PrefixIndex

# A token is about this many characters of prompt (no tokenizer on the router).
CHARS_PER_TOKEN = 4
# What one request in flight on a node costs a new one there, in prompt tokens to prefill: a
# queued or running request takes about as long as prefilling a few hundred tokens, so a
# holder of a long prefix keeps winning unless it is several requests busier.
LOAD_WEIGHT_TOKENS = 256

# Why a node was chosen (``Balancer.reason``; the ``reason`` label of the routing metric).
PREFIX = "prefix"  # it holds the longest prefix of the prompt among the ready nodes
LOAD = "load"  # another node holds more of the prompt, but is saturated or busier
AFFINITY = "affinity"  # the user's or session's node, among equally good ones
FALLBACK = "fallback"  # no ready node holds any of the prompt (or no keys, or p2c)
REASONS = (PREFIX, LOAD, AFFINITY, FALLBACK)


class NodeLike(Protocol):
    """What the balancer needs from the fleet's view of a node."""

    node_id: str
    url: str
    slots: int
    token: str | None


@dataclass(slots=True, eq=False)
class NodeState:
    """This router process's bookkeeping for one node."""

    node_id: str
    url: str
    slots: int
    token: str | None = field(default=None, repr=False)  # bearer credential for the node
    outstanding: int = 0
    reported: int = 0  # the node's own active count at its last heartbeat (all routers)
    failures: int = 0  # distinct requests that failed here since the last success
    healthy: bool = True  # False from cool-down until a health probe succeeds
    cooldown_until: float = 0.0
    probing: bool = False
    probe_ok: bool = False  # a probe during the cool-down passed: back when it ends
    next_check: float = 0.0  # no health check of a node answering 5xx before then
    failed_requests: set[int] = field(default_factory=set, repr=False)

    def usable_at(self, now: float) -> bool:
        """Healthy, or cooled down with a passed probe and the cool-down over."""
        if not self.healthy and self.probe_ok and now >= self.cooldown_until:
            self.healthy = True
            self.probe_ok = False
            self.failures = 0
            self.failed_requests.clear()
        return self.healthy


class NoPick(enum.Enum):
    """Why :meth:`Balancer.pick` found no node."""

    NONE = "none"  # no candidate left (none ready, or all already tried)
    SATURATED = "saturated"  # every usable node is at its slot count
    COOLING = "cooling"  # every remaining node is cooling down after failures


class Balancer:
    """Least-outstanding-per-slot, power-of-two-choices node picker with affinity.

    Args:
        failure_threshold: failures of that many different requests since the node's last
            success (time-outs, lost connections, cut streams) put it into cool-down.
        cooldown_s: seconds a failing node gets no traffic before it is health-probed.
        affinity_max_keys: bound of the affinity table (oldest entries are dropped).
        on_probe_due: called with a node whose cool-down ended and that needs a health probe.
        clock: monotonic clock (tests inject one).
        rng: random source (tests inject a seeded one).
        index: what each node's prompt cache holds; ``None``: two random choices only.
        load_weight: prompt tokens one request in flight is worth in the cost.

    After a successful :meth:`pick`, ``reason`` says why the node was chosen (one of
    :data:`REASONS`) and ``matched`` how many prompt characters the index says it holds.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        cooldown_s: float = 10.0,
        affinity_max_keys: int = 100_000,
        on_probe_due: Callable[[NodeState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        index: PrefixIndex | None = None,
        load_weight: int = LOAD_WEIGHT_TOKENS,
    ):
        self.index = index
        self.load_weight = load_weight
        self.reason = FALLBACK
        self.matched = 0
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown_s = cooldown_s
        self.affinity_max_keys = affinity_max_keys
        self.on_probe_due = on_probe_due
        self._clock = clock
        self._random = (rng or random.Random()).random
        self._nodes: dict[str, NodeState] = {}
        self._affinity: dict[str, str] = {}

    @property
    def nodes(self) -> dict[str, NodeState]:
        """Every node seen so far, by id."""
        return self._nodes

    def state(self, view: NodeLike) -> NodeState:
        """The state of ``view``'s node, created (or reset when its URL or token changed)."""
        state = self._nodes.get(view.node_id)
        if state is None or state.url != view.url or state.token != view.token:
            state = NodeState(view.node_id, view.url, max(1, view.slots), view.token)
            self._nodes[view.node_id] = state
        elif state.slots != view.slots:
            state.slots = max(1, view.slots)
        return state

    def pick(
        self,
        views: Iterable[NodeLike],
        affinity_key: str | None = None,
        exclude: Collection[str] = (),
        model: str | None = None,
        keys: PrefixKeys | None = None,
    ) -> NodeState | NoPick:
        """Choose a node among ``views`` (nodes ready for the model), skipping ``exclude``.

        A node is usable when it is healthy and has fewer outstanding requests than slots.
        With ``keys`` (the request's prefix keys for ``model``) and an index where some ready
        node holds part of the prompt, the usable node of least cost wins (see the module);
        ties go to the node that last served ``affinity_key``, then to two random choices.
        Otherwise the node that last served ``affinity_key`` wins while usable, else two
        usable nodes are drawn at random and the one with fewer outstanding requests per slot
        is chosen.

        Returns:
            The chosen node's state, or a :class:`NoPick` saying why there is none.
        """
        usable: list[NodeState] = []
        full: list[str] = []  # saturated nodes: their prefixes still count for ``reason``
        saturated = cooling = False
        now = 0.0
        for view in views:
            state = self._nodes.get(view.node_id)
            if (
                state is None
                or state.url != view.url
                or state.slots != view.slots
                or state.token != view.token
            ):
                state = self.state(view)
            if state.node_id in exclude:
                continue
            state.reported = getattr(view, "active", 0)
            if not state.healthy:
                now = now or self._clock()
                if not state.usable_at(now):
                    cooling = True
                    if not state.probing and self.on_probe_due is not None:
                        state.probing = True
                        self.on_probe_due(state)
                    continue
            if state.outstanding >= state.slots:
                saturated = True
                full.append(state.node_id)
                continue
            usable.append(state)
        count = len(usable)
        if count == 0:
            if saturated:
                return NoPick.SATURATED
            return NoPick.COOLING if cooling else NoPick.NONE
        if keys and model is not None and self.index is not None:
            ids = [state.node_id for state in usable]
            if full:
                ids += full
            found = self.index.longest(model, keys, ids)
            if found:
                return self._cheapest(usable, found, keys[-1][1], affinity_key)
        self.matched = 0
        if count == 1:
            self.reason = FALLBACK
            return usable[0]
        if affinity_key is not None:
            node_id = self._affinity.get(affinity_key)
            if node_id is not None:
                for state in usable:
                    if state.node_id == node_id:
                        self.reason = AFFINITY
                        return state
        self.reason = FALLBACK
        return self._two_choices(usable)

    def _two_choices(self, usable: list[NodeState]) -> NodeState:
        """Of two nodes drawn at random, the one with fewer requests per slot."""
        count = len(usable)
        if count == 1:
            return usable[0]
        rand = self._random
        first = int(rand() * count)
        second = int(rand() * (count - 1))
        if second >= first:
            second += 1
        a, b = usable[first], usable[second]
        # Compare load/slots without dividing. A node's load is what this router has in flight
        # there, or what it last reported when other routers keep it busier.
        a_load, b_load = max(a.outstanding, a.reported), max(b.outstanding, b.reported)
        return b if b_load * a.slots < a_load * b.slots else a

    def _cheapest(
        self,
        usable: list[NodeState],
        found: dict[str, int],
        total: int,
        affinity_key: str | None,
    ) -> NodeState:
        """The usable node of least cost (prefill left + load); sets ``reason``/``matched``."""
        weight = self.load_weight
        best = -1
        tied: list[NodeState] = []
        for state in usable:
            prefill = (total - found.get(state.node_id, 0)) // CHARS_PER_TOKEN
            cost = prefill + weight * state.outstanding
            if best < 0 or cost < best:
                best = cost
                tied = [state]
            elif cost == best:
                tied.append(state)
        reason = None
        chosen = tied[0]
        if len(tied) > 1:
            node_id = self._affinity.get(affinity_key) if affinity_key is not None else None
            for state in tied:
                if state.node_id == node_id:
                    chosen, reason = state, AFFINITY
                    break
            else:
                chosen = self._two_choices(tied)
        matched = found.get(chosen.node_id, 0)
        if reason is None:
            reason = PREFIX if matched and matched >= max(found.values()) else LOAD
        self.reason, self.matched = reason, matched
        return chosen

    def remember(self, affinity_key: str, node_id: str) -> None:
        """Record that ``node_id`` served ``affinity_key`` (bounded; oldest entries go first)."""
        table = self._affinity
        if table.get(affinity_key) == node_id:
            return
        table.pop(affinity_key, None)
        table[affinity_key] = node_id
        if len(table) > self.affinity_max_keys:
            del table[next(iter(table))]

    def affinity(self, affinity_key: str) -> str | None:
        """The node that last served ``affinity_key``, if remembered."""
        return self._affinity.get(affinity_key)

    def record_success(self, state: NodeState) -> None:
        """An attempt on ``state`` got a usable answer: reset its failure count."""
        if state.failures:
            state.failures = 0
            state.failed_requests.clear()

    def record_failure(
        self, state: NodeState, request: int | None = None, *, immediate: bool = False
    ) -> bool:
        """Count a failure that says the node is unhealthy for everyone (no connection, a
        time-out, a lost connection or a cut stream, a failed health check; never a request's
        own 5xx); start a cool-down at the threshold (or at once if ``immediate``).

        Args:
            request: identifies the request (a hash of its body): failures of one request,
                such as a client's retries of a request the nodes reject, count once.
            immediate: cool the node down now (nothing listens there).

        Returns:
            True when this failure put the node into cool-down.
        """
        if request is None or request not in state.failed_requests:
            if request is not None and len(state.failed_requests) < self.failure_threshold:
                state.failed_requests.add(request)
            state.failures += 1
        if state.healthy and (immediate or state.failures >= self.failure_threshold):
            state.healthy = False
            state.probe_ok = False
            state.cooldown_until = self._clock() + self.cooldown_s
            if not state.probing and self.on_probe_due is not None:
                state.probing = True  # probed during the cool-down, not after it
                self.on_probe_due(state)
            return True
        return False

    def forgive(self, state: NodeState, request: int) -> None:
        """Take back a failure of ``request`` on ``state``: the request was at fault (it does
        not end a cool-down already started: the health probe does)."""
        if request in state.failed_requests:
            state.failed_requests.discard(request)
            state.failures = max(0, state.failures - 1)

    def now(self) -> float:
        """The balancer's clock."""
        return self._clock()

    def probe_passed(self, state: NodeState) -> None:
        """A probe passed: the node is back in service as soon as its cool-down ends."""
        if not state.healthy:
            state.probe_ok = True
            state.usable_at(self._clock())

    def probe_failed(self, state: NodeState) -> None:
        """A probe failed: the cool-down lasts another ``cooldown_s`` from now."""
        state.probe_ok = False
        state.cooldown_until = max(state.cooldown_until, self._clock() + self.cooldown_s)

    def probe_finished(self, state: NodeState, ok: bool) -> None:
        """Apply a health probe's result and end the probe."""
        state.probing = False
        if ok:
            self.probe_passed(state)
        else:
            self.probe_failed(state)

    def cooldown_left(self, views: Iterable[NodeLike]) -> float:
        """Seconds until the first of ``views``' cooling nodes may be probed (0 if none cools)."""
        now = self._clock()
        left = [
            max(0.0, state.cooldown_until - now)
            for view in views
            if (state := self._nodes.get(view.node_id)) is not None and not state.healthy
        ]
        return min(left, default=0.0)
