"""The inference proxy: raw ASGI, forwards a request's original bytes to a ready node.

For ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` (the router
checks the key's ``api`` scope first), the proxy reads only the body's ``model`` (and ``user``),
normalises the id, lets the :class:`~llmlb.router.proxy.balancer.Balancer` pick a node that reports
the model ready, sends the unchanged body there over a pooled keep-alive connection
(:mod:`llmlb.router.proxy.upstream`) and relays the answer chunk by chunk. Before any byte reached
the client, a connect error, a first-byte timeout, a dropped connection or a 5xx (or a node's
429) moves the request to another node (at most ``max_retries`` more); afterwards a failure
ends an SSE stream with an OpenAI-shaped error event (and no ``data: [DONE]``). Bodies nested
deeper than :data:`llmlb.http.MAX_JSON_DEPTH` get 400 before any node sees them.

The same goes for ``/v1/responses`` and Anthropic's ``/v1/messages`` and
``/v1/messages/count_tokens``; on the latter the errors the router itself produces (and a
stream's closing error event) are in Anthropic's shape (:mod:`llmlb.anthropic_errors`).

Protection of the fleet and of the router itself:

- A node is cooled down only on evidence that it fails everyone: a refused connection (at
  once), a failed health check, or time-outs, lost connections and cut streams of
  ``failure_threshold`` *different* requests (by body). A node answering 5xx is not: that is
  most often the request's content; it is health-checked instead (at most once per
  ``cooldown_s``). A cooled-down node is health-probed during its cool-down, so a healthy
  node is back the moment the cool-down ends.
- A request that got a 5xx from two nodes is the request's fault: it is not retried further
  and counts against neither node.
- A request a node lost (connection closed after it was sent, stream cut) or timed out on
  goes to at most one more node; one that two nodes failed that way is *poison*
  (:class:`~llmlb.router.proxy.balancer.PoisonLog`): 502 ``poison_request`` to its client, counted
  against neither node, and the same body is refused at once for ``poison_ttl_s``. A refused
  connection (the node never saw the request) fails over freely.
- Each worker takes at most ``max_inflight`` inference requests at once (queued ones
  included); more get 503 ``overloaded`` with ``Retry-After`` at once. Other routes
  (``/health``, node registration and heartbeats, admin) do not count against it.
- A client that goes away (before or after the first byte, or while queued) cancels its
  request: the node connection is closed, which tells the node to stop generating. So does
  the router's own ``total_timeout_s``.
- A stream whose node stays silent for ``stream_idle_timeout_s``, or whose node the fleet
  marks offline, ends at once with an error event.

Prefix-aware routing (``routing`` ``prefix``, the default): for the chat, completions,
Responses and Messages routes the proxy computes the body's prefix keys
(:func:`llmlb.prefix_keys.request_keys`, from the body it parsed anyway), the balancer
weighs what each ready node's cache holds of the prompt (:class:`PrefixIndex`, fed by the
nodes' cache reports) against its load, and once a node answered, the request's keys are
recorded as held there (a guess its reports confirm). ``p2c`` computes no keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields, replace
from time import perf_counter
from typing import Any, Protocol

import orjson

from llmlb import anthropic_errors, config
from llmlb.asgi import Receive, Scope, Send
from llmlb.errors import (
    ApiError,
    error_body,
    invalid_model_id,
    model_not_found,
    request_too_large,
)
from llmlb.http import check_depth
from llmlb.model_storage import normalize_model_id
from llmlb.prefix_keys import PrefixKeys, request_keys
from llmlb.router.control.limits import PRIORITY_WEIGHTS
from llmlb.router.proxy.admission import (
    Admission,
    KeyState,
    LimitExceeded,
    NeedLease,
    Ticket,
    estimate_tokens,
)
from llmlb.router.proxy.balancer import (
    Balancer,
    NodeLike,
    NodeState,
    NoPick,
    PoisonLog,
    WaitPlace,
    WaitQueue,
)
from llmlb.router.proxy.metrics import ProxyMetrics, default_metrics
from llmlb.router.proxy.prefix_index import PrefixIndex
from llmlb.router.proxy.upstream import (
    ConnectError,
    NodePool,
    Response,
    UpstreamError,
    UpstreamTimeout,
)
from llmlb.router.proxy.usage import Usage, UsageTap, ask_for_usage

logger = logging.getLogger(__name__)

# Response headers not relayed: hop-by-hop ones, and those the ASGI server sets itself.
_DROPPED_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-connection",
        b"server",
        b"date",
    }
)
_JSON_HEADER = (b"content-type", b"application/json")
_NODE_HEADER = b"x-llmlb-node"
_SESSION_HEADER = b"x-session-id"
_MAX_CACHED_IDS = 4096
# Routes whose prompts a node caches: their bodies get prefix keys (count_tokens and
# embeddings leave nothing in a cache worth routing to).
_KEYED_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}
)
_NOT_READY_RETRY_AFTER_S = 5.0
_NO_USAGE = Usage()
# Where the router's app leaves the authenticated key (llmlb.router.control.keys.KeyEntry).
KEY_SCOPE = "llmlb.key"
# A request still in the router this long gets its client's disconnect watched: Granian's watch
# costs thread wake-ups per request, and a quicker answer has nothing to save by it.
_WATCH_AFTER_S = 0.1


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Tuning of the inference proxy; each field may be set by ``LLMLB_PROXY_<FIELD>``.

    Attributes:
        connect_timeout_s: TCP connect to a node.
        first_byte_timeout_s: request sent until the node's first body bytes (a non-streaming
            answer arrives whole, so this bounds a whole generation).
        stream_idle_timeout_s: longest silence of a node between two pieces of an answer
            once its first bytes arrived; the stream then ends with an error event.
        total_timeout_s: longest time of a whole request in the router (0: no limit); the
            node request is cancelled then (504 before the first byte, else an error event),
            within a tenth of the limit (at most 1 s) after it passed.
        max_inflight: inference requests one worker takes at once (waiting ones included);
            beyond it, 503 ``overloaded`` with ``Retry-After`` at once.
        max_retries: other nodes tried after a failure before any byte reached the client.
        queue_max: requests that may wait for a free slot at once; beyond it, 429 at once.
        queue_timeout_s: longest wait for a free slot, then 429 with ``Retry-After``.
        ready_wait_s: longest wait for a model that is registered or being downloaded or
            loaded by a node, then 503 ``model_not_ready`` with ``Retry-After``.
        failure_threshold: time-outs, lost connections or cut streams of that many different
            requests since a node's last success cool it down.
        cooldown_s: a cooled-down node gets no traffic this long; it is health-probed shortly
            before the end (and again after each failed probe).
        probe_timeout_s: limit of the ``GET <node>/health`` probe.
        retry_after_s: ``Retry-After`` of 429 answers.
        max_body_bytes: largest request body (413 beyond); the router's own limit when hosted
            by the router.
        affinity_max_keys: ``user``/``X-Session-Id`` values remembered for affinity.
        poison_ttl_s: how long a request that two nodes lost or timed out on is refused
            (and a single such failure remembered).
        poison_max_keys: such requests remembered at most (oldest dropped first).
        routing: ``prefix`` (one cost for the prefill a node's cache saves and its load) or
            ``p2c`` (two random choices by requests in flight); ``LLMLB_ROUTING``, not
            ``LLMLB_PROXY_ROUTING`` (:func:`llmlb.config.routing`).
    """

    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 300.0
    stream_idle_timeout_s: float = 60.0
    total_timeout_s: float = 1800.0
    max_inflight: int = 2048
    max_retries: int = 2
    queue_max: int = 1024
    queue_timeout_s: float = 30.0
    ready_wait_s: float = 30.0
    failure_threshold: int = 3
    cooldown_s: float = 10.0
    probe_timeout_s: float = 2.0
    retry_after_s: float = 1.0
    max_body_bytes: int = 16 * 1024 * 1024
    affinity_max_keys: int = 100_000
    poison_ttl_s: float = 600.0
    poison_max_keys: int = 4096
    routing: str = config.DEFAULT_ROUTING

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxySettings:
        """The settings from their ``asdict`` form (unknown keys are ignored)."""
        return config.settings_from_dict(cls, data)

    @classmethod
    def from_config(cls) -> ProxySettings:
        """Defaults overridden by ``LLMLB_PROXY_*`` env vars or ``config.json``'s ``proxy``.

        Raises:
            ValueError: a value does not parse as its field's type.
        """
        raw = config.proxy_overrides([f.name for f in fields(cls) if f.name != "routing"])
        values: dict[str, Any] = {"routing": config.routing()}
        for field in fields(cls):
            if field.name in raw:
                kind = int if type(field.default) is int else float
                try:
                    values[field.name] = kind(raw[field.name])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"proxy setting {field.name}: {exc}") from None
        return cls(**values)


class Fleet(Protocol):
    """What the proxy needs of :class:`llmlb.router.control.fleet.FleetView`."""

    def ready_nodes(self, model_id: str) -> list[NodeLike]: ...

    def model_status(self, model_id: str) -> str: ...

    def incapable(self, model_id: str) -> tuple[str | None, list[str]]: ...

    def node_online(self, node_id: str) -> bool: ...

    async def wait_for_change(self, timeout: float) -> None: ...

    def mark_node_offline(self, node_id: str) -> None: ...

    def on_gone(self, callback: Callable[[str], None]) -> None: ...


def _node_pool(state: NodeState, settings: ProxySettings) -> NodePool:
    """A keep-alive connection pool to ``state``'s node, presenting the node's token."""
    return NodePool(
        state.url,
        token=state.token,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.first_byte_timeout_s,  # first byte, then each silence
        keepalive_s=30.0,
    )


# Ways an attempt fails (``_Failure.kind``, and the ``kind`` label of the error metric).
_BUSY, _STATUS, _CONNECT = "busy", "status", "connect"
_TIMEOUT, _DISCONNECT = "timeout", "disconnect"


@dataclass(slots=True)
class _Failure:
    """What the client gets if no other node can take the request, and how the attempt
    failed: ``kind`` (busy, status, connect, timeout, disconnect); ``held``: the node had the
    request when it failed (it may have killed or hung the node)."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    kind: str = _STATUS
    held: bool = False


@dataclass(slots=True, eq=False)
class _Exchange:
    """One client request's life in the router: what it asks, what was sent, and why it was
    cut short.

    ``reason`` is set (``client_gone`` or ``total_timeout``) just before the request's task
    is cancelled; ``node`` is the node of the current attempt, if any; ``request`` (the
    body's hash) makes one request's failures count once per node.
    """

    scope: Scope
    send: Send
    task: asyncio.Task | None
    body: bytes
    model: str
    affinity_key: str | None
    start: float  # perf_counter() when the request arrived
    request: int = 0
    keys: PrefixKeys | None = None  # the body's prefix keys (prefix routing only)
    matched: int = 0  # prompt characters the index says the chosen node holds
    generation: int = 0  # of the chosen node in the index (see PrefixIndex.generation)
    started: bool = False  # http.response.start went out
    sse: bool = False
    finished: bool = False
    reason: str | None = None
    node: str | None = None
    anthropic: bool = False  # an Anthropic route: the router's errors in Anthropic's shape
    watch: _ClientWatch | None = None  # the client's disconnect watch, once armed
    tap: bool = False  # read the node's usage out of the answer
    strip_usage: bool = False  # the router asked for the stream's usage chunk: drop it
    usage: Usage | None = None  # what the node reported
    status: int = 0  # of the node's answer relayed to the client
    rated: KeyState | None = None  # a limited key's counters: x-ratelimit-* on its answer
    flow: str | None = None  # the key's id: fair queuing across keys
    weight: float = PRIORITY_WEIGHTS["normal"]  # its share, by the key's priority
    priority: bytes = b""  # X-Llmlb-Priority sent to the node (a non-normal priority)

    def cut(self, reason: str) -> None:
        """Cancel the request (unless it is over already)."""
        if not self.finished and self.reason is None and self.task is not None:
            self.reason = reason
            self.task.cancel()


class InferenceProxy:
    """Raw ASGI app forwarding OpenAI inference requests to ready nodes.

    Args:
        fleet: the in-memory view of nodes and models
            (:class:`~llmlb.router.control.fleet.FleetView`).
        settings: a :class:`ProxySettings`; anything else (the router's settings, ``None``)
            means :meth:`ProxySettings.from_config`, taking ``max_body_bytes`` from it if set.
        metrics: where to count; by default the process-wide metrics in the default registry.
        clock: monotonic clock of cool-downs and the poison log (tests inject one).
        index: what the nodes' prompt caches hold (fed by their cache reports); a new one
            by default. Nodes the fleet loses are forgotten in it.
        admission: the limited keys' counters (the worker's, shared with the runtime that
            syncs budgets); a new one by default.
        on_usage: called once per finished request of a key (the app puts the key's
            :class:`~llmlb.router.control.keys.KeyEntry` in the scope) with ``key_id, model,
            node, prompt_tokens, cached_tokens, completion_tokens, error``; no I/O allowed.
        lease: shared mode (``admission.shared``): gets more of a key's quota
            (:meth:`llmlb.router.runtime.Runtime.lease`); ``None`` when granted, else the
            seconds to wait.
    """

    def __init__(
        self,
        fleet: Fleet,
        settings: Any = None,
        *,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        index: PrefixIndex | None = None,
        admission: Admission | None = None,
        on_usage: Callable[[str, str, str, int, int, int, bool], None] | None = None,
        lease: Callable[[str, Any, list], Awaitable[float | None]] | None = None,
    ):
        self.fleet = fleet
        if isinstance(settings, ProxySettings):
            self.settings = settings
        elif handed := getattr(settings, "proxy", None):  # what `llmlb router` built
            self.settings = ProxySettings.from_dict(handed)
        else:
            self.settings = ProxySettings.from_config()
            if limit := getattr(settings, "max_body_bytes", None):
                self.settings = replace(self.settings, max_body_bytes=limit)
        self.metrics = metrics or default_metrics()
        self.index = index if index is not None else PrefixIndex()
        on_gone = getattr(fleet, "on_gone", None)
        if on_gone is not None:
            on_gone(self.index.forget)
        self.prefix = self.settings.routing == "prefix"
        self.balancer = Balancer(
            failure_threshold=self.settings.failure_threshold,
            cooldown_s=self.settings.cooldown_s,
            affinity_max_keys=self.settings.affinity_max_keys,
            on_probe_due=self._probe_later,
            clock=clock,
            index=self.index if self.prefix else None,
        )
        self.poison = PoisonLog(self.settings.poison_ttl_s, self.settings.poison_max_keys, clock)
        self.queue = WaitQueue(self.settings.queue_max)
        self.admission = admission if admission is not None else Admission()
        self.on_usage = on_usage
        self.lease = lease
        self.inflight = 0
        overloaded = ApiError(
            503,
            "overloaded",
            f"the router is at its limit of {self.settings.max_inflight} requests in flight; "
            "retry later",
            retry_after=self.settings.retry_after_s,
        )
        self._overloaded = tuple(
            (
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": _error_headers(body, overloaded.retry_after),
                },
                {"type": "http.response.body", "body": body},
            )
            for body in (overloaded.body(), anthropic_errors.from_api_error(overloaded))
        )
        self._clients: dict[str, NodePool] = {}
        self._model_ids: dict[str, str | ApiError] = {}
        self._tasks: set[asyncio.Task] = set()
        self._exchanges: set[_Exchange] = set()  # requests in flight, for _expire
        self._unwatched: deque[tuple[_Exchange, Receive]] = deque()  # for _watch_clients
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._started = False

    async def start(self) -> None:
        """Start background work (fleet watcher, time limit, state gauges); call at lifespan
        start."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self.metrics.watch(self.balancer, self.queue, lambda: self.inflight)
        self._spawn(self._watch_fleet())
        self._spawn(self._watch_clients())
        if self.settings.total_timeout_s > 0:
            self._spawn(self._expire())

    async def close(self) -> None:
        """Stop background work and close every node connection pool."""
        self._started = False
        for _ in range(3):  # cancelled tasks may spawn one last session close
            if not self._tasks:
                break
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1.0)
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()
        self.metrics.unwatch()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = perf_counter()
        anthropic = scope["path"] in anthropic_errors.ANTHROPIC_PATHS
        if self.inflight >= self.settings.max_inflight:
            self.metrics.rejected(503)
            head, tail = self._overloaded[anthropic]
            await send(head)
            await send(tail)
            return
        self.inflight += 1
        ticket: Ticket | None = None
        ex: _Exchange | None = None
        rated: KeyState | None = None  # a limited key's counters: its answers' headers
        model = ""
        try:
            body = await self._read_body(receive)
            if body is None:
                return  # the client went away
            model, affinity_key, keys, doc = self._parse(body, scope)
            entry = scope.get(KEY_SCOPE)
            limits = None if entry is None else entry.limits
            if limits is not None:
                # Every answer to a limited key carries its x-ratelimit-* headers, refusals too.
                rated = self.admission.state(entry.id, limits)
                estimate = estimate_tokens(body, doc)
                try:
                    ticket = self.admission.admit(entry.id, limits, model, estimate)
                except NeedLease as need:
                    ticket = await self._admit_leased(entry.id, limits, model, estimate, need)
            tap = strip = False
            if entry is not None and (limits is not None or self.on_usage is not None):
                tap = True  # the node's usage settles the reservation and is accounted
                if ask_for_usage(scope["path"], doc):
                    body, strip = orjson.dumps(doc), True
            # With the loop given, no getpid() per call (3.11's get_running_loop makes one).
            task = asyncio.current_task(self._loop) or asyncio.current_task()
            ex = _Exchange(scope, send, task, body, model, affinity_key, start)
            ex.anthropic = anthropic
            ex.keys = keys
            ex.tap, ex.strip_usage = tap, strip
            ex.rated = rated
            if entry is not None:
                ex.flow = entry.id
                priority = None if limits is None else limits.priority
                if priority is not None and priority != "normal":
                    ex.weight = PRIORITY_WEIGHTS[priority]
                    ex.priority = b"X-Llmlb-Priority: " + priority.encode() + b"\r\n"
            await self._guarded(ex, receive)
        except ApiError as exc:
            self.metrics.rejected(exc.status)
            extra = None if rated is None else self.admission.headers(rated)
            await _send_error(send, exc, anthropic, extra)
        finally:
            self.inflight -= 1
            if ticket is not None:
                self.admission.settle(ticket, _tokens_used(ex))
            if self.on_usage is not None and model and KEY_SCOPE in scope:
                self._account(scope[KEY_SCOPE].id, model, ex)

    async def _admit_leased(
        self, key_id: str, limits: Any, model: str, estimate: int, need: NeedLease
    ) -> Ticket:
        """Admit a limited key's request whose shared lease ran short: lease more, admit again.

        Raises:
            LimitExceeded: 403 or 429.
        """
        for _ in range(3):
            wait = 1.0 if self.lease is None else await self.lease(key_id, limits, need.needs)
            if wait is not None:
                raise LimitExceeded(
                    429,
                    "rate_limit_exceeded",
                    f"rate limit reached for this key across the fleet; retry in {wait:.1f} s",
                    retry_after=wait,
                )
            try:
                return self.admission.admit(key_id, limits, model, estimate)
            except NeedLease as again:
                need = again
        raise LimitExceeded(
            429, "rate_limit_exceeded", "this key's quota is in high demand", retry_after=1.0
        )

    def _account(self, key_id: str, model: str, ex: _Exchange | None) -> None:
        """Hand one finished request of a key to the usage book (``ex`` ``None``: refused
        before it was forwarded)."""
        on_usage = self.on_usage
        assert on_usage is not None
        if ex is None:
            on_usage(key_id, model, "", 0, 0, 0, True)
            return
        error = not ex.started or ex.status >= 400 or ex.reason is not None
        use = ex.usage or _NO_USAGE
        on_usage(key_id, model, ex.node or "", use.prompt, use.cached, use.completion, error)

    async def _guarded(self, ex: _Exchange, receive: Receive) -> None:
        """Forward the request, cancelling it when the client leaves or time runs out (found
        by :meth:`_watch_clients` and :meth:`_expire`: no task or timer per request)."""
        task = ex.task
        if self._started:
            self._unwatched.append((ex, receive))
        else:
            ex.watch = _ClientWatch(receive, ex)
        exchanges = self._exchanges
        exchanges.add(ex)
        try:
            await self._forward(ex)
        except asyncio.CancelledError:
            if ex.reason is None or task is None:
                raise
            task.uncancel()
            await self._cut_short(ex)
        finally:
            ex.finished = True
            exchanges.discard(ex)
            if ex.watch is not None:
                ex.watch.close()

    async def _watch_clients(self) -> None:
        """Watch the client of every request in the router for longer than
        :data:`_WATCH_AFTER_S` for its disconnect (checking that often)."""
        pending = self._unwatched
        while self._started:
            await asyncio.sleep(_WATCH_AFTER_S)
            oldest = perf_counter() - _WATCH_AFTER_S
            while pending and pending[0][0].start <= oldest:
                ex, receive = pending.popleft()
                if not ex.finished:
                    try:
                        ex.watch = _ClientWatch(receive, ex)
                    except Exception:  # a server refusing the receive: nothing to watch
                        logger.debug("cannot watch the client's disconnect", exc_info=True)

    async def _expire(self) -> None:
        """Cut every request in the router for longer than ``total_timeout_s``, checking a
        tenth of the limit (at most a second) apart."""
        limit = self.settings.total_timeout_s
        period = min(1.0, limit / 10)
        while self._started:
            await asyncio.sleep(period)
            oldest = perf_counter() - limit
            for ex in [ex for ex in self._exchanges if ex.start <= oldest]:
                ex.cut("total_timeout")

    async def _cut_short(self, ex: _Exchange) -> None:
        """Answer what can still be answered of a request cancelled for ``ex.reason``."""
        self.metrics.error(ex.node or "", ex.model, ex.reason or "")
        if ex.reason == "client_gone":
            return
        limit = self.settings.total_timeout_s
        message = f"the request exceeded the router's time limit of {limit:g} s"
        with contextlib.suppress(Exception):  # the client may be gone too
            if not ex.started:
                self.metrics.rejected(504)
                extra = None if ex.rated is None else self.admission.headers(ex.rated)
                error = ApiError(504, "upstream_timeout", message)
                await _send_error(ex.send, error, ex.anthropic, extra)
            else:
                tail = _sse_error(message, "upstream_timeout", 504, ex.anthropic) if ex.sse else b""
                await ex.send({"type": "http.response.body", "body": tail, "more_body": False})

    # -- request -------------------------------------------------------------------------

    async def _read_body(self, receive: Receive) -> bytes | None:
        limit = self.settings.max_body_bytes
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > limit:
                raise request_too_large(limit)
            return body
        parts = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise request_too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    def _parse(
        self, body: bytes, scope: Scope
    ) -> tuple[str, str | None, PrefixKeys | None, dict[str, Any]]:
        """The normalised model id, the affinity key, the prefix keys (prefix routing,
        routes whose prompts nodes cache), and the parsed body (admission of a limited key
        reads its ``max_tokens``)."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ApiError(400, "invalid_request_error", "request body is not valid JSON") from None
        if type(doc) is not dict:
            raise ApiError(400, "invalid_request_error", "request body must be a JSON object")
        check_depth(doc)
        raw = doc.get("model")
        if type(raw) is not str:
            raise ApiError(400, "invalid_request_error", "'model' is required and must be a string")
        model = self._model_ids.get(raw)
        if model is None:
            try:
                model = normalize_model_id(raw)
            except ValueError as exc:
                model = invalid_model_id(exc)
            if len(self._model_ids) >= _MAX_CACHED_IDS:
                self._model_ids.clear()
            self._model_ids[raw] = model
        if type(model) is not str:
            raise ApiError(model.status, model.code, model.message)
        keys = None
        if self.prefix and scope["path"] in _KEYED_PATHS:
            try:
                keys = request_keys(scope["path"], doc)
            except Exception:  # noqa: BLE001 - a body the node will refuse: route it anyhow
                keys = None
        for name, value in scope["headers"]:
            if name == _SESSION_HEADER:
                return model, "s:" + value.decode("latin-1"), keys, doc
        user = doc.get("user")
        if type(user) is str and user:
            return model, "u:" + user, keys, doc
        return model, None, keys, doc

    # -- forwarding ----------------------------------------------------------------------

    async def _forward(self, ex: _Exchange) -> None:
        model = ex.model
        ex.request = request = hash(ex.body)  # one request's failures count once per node
        poison = self.poison
        if poison and poison.is_poison(request):
            self.metrics.error("", model, "poison")
            raise _poison_error(self.settings.poison_ttl_s)
        tried: list[str] = []
        failure: _Failure | None = None
        status_failed: NodeState | None = None  # first node that answered this request 5xx
        held_by: NodeState | None = None  # node that lost the request or timed out on it
        held_kind = _DISCONNECT
        for _ in range(1 + self.settings.max_retries):
            state = await self._acquire(ex, tried)
            if state is None:
                break
            if failure is not None:
                self.metrics.retry(tried[-1], model)
            tried.append(state.node_id)
            failure = await self._attempt(state, ex)
            if failure is None:
                if held_by is not None:  # another node served it: the first one was at fault
                    self._blame(held_by, held_kind, request)
                return
            if failure.held:  # the node may have died or hung of this very request
                culprits = poison.strike(request, state.node_id)
                if culprits is not None:
                    # Two nodes failed it: refused, and counted against neither.
                    self._forgive(culprits, request)
                    self.metrics.error(state.node_id, model, "poison")
                    logger.warning("request poisoned nodes %s: refused", ", ".join(culprits))
                    failure = _poison_failure(self.settings.poison_ttl_s)
                    held_by = None
                    break
                if status_failed is not None:
                    break  # a node refused it already: suspect, and blamed on neither
                held_by, held_kind = state, failure.kind  # handed to one more node at most
            elif failure.kind == _STATUS:
                self._suspect(state)
                if status_failed is not None or held_by is not None:
                    # Two nodes failed it: the request is at fault, not the fleet.
                    self.metrics.error(state.node_id, model, "poison")
                    held_by = None
                    break
                status_failed = state
            # A refused connection or a busy node: the node never took it, fail over freely.
        if held_by is not None:  # no other node could tell whether the request was at fault
            self._blame(held_by, held_kind, request)
        assert failure is not None  # the first _acquire returns a node or raises
        self.metrics.rejected(failure.status)
        headers, body = failure.headers, failure.body
        if ex.anthropic:  # a node's own answer is in that shape already and stays as it is
            reshaped = anthropic_errors.from_openai_body(body, failure.status)
            if reshaped is not body:
                body = reshaped
                headers = [h for h in headers if h[0] != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
        if ex.rated is not None:
            headers = [*headers, *self.admission.headers(ex.rated)]
        await ex.send({"type": "http.response.start", "status": failure.status, "headers": headers})
        await ex.send({"type": "http.response.body", "body": body})

    async def _acquire(self, ex: _Exchange, tried: list[str]) -> NodeState | None:
        """Take a slot on a node ready for ``ex.model``, waiting within the configured bounds
        (and count why the balancer chose it; ``ex.matched``: what its cache holds).

        Returns:
            The node, or ``None`` on a retry when no untried node is left.

        Raises:
            ApiError: 404 unknown model; 503 not ready in time, or every node cooling down;
                429 when the wait queue is full or the wait for a slot timed out.
        """
        settings = self.settings
        model, affinity_key, keys = ex.model, ex.affinity_key, ex.keys
        ready_deadline = queue_deadline = queued_since = 0.0
        front = False
        place = WaitPlace()  # its fair-queuing tag, kept when woken without a slot
        while True:
            views = self.fleet.ready_nodes(model)
            if views:
                if front or not self.queue.has_waiters(model):
                    balancer = self.balancer
                    pick = balancer.pick(views, affinity_key, tried, model, keys)
                    if type(pick) is NodeState:
                        pick.outstanding += 1
                        ex.matched = balancer.matched
                        if keys:
                            ex.generation = self.index.generation(pick.node_id)
                        self.metrics.routed(model, balancer.reason)
                        if queued_since:
                            self.metrics.queue_wait(model, perf_counter() - queued_since)
                        return pick
                    if pick is not NoPick.SATURATED:
                        if tried:
                            return None
                        if pick is NoPick.COOLING:
                            raise ApiError(
                                503,
                                "nodes_unavailable",
                                f"every node serving '{model}' is failing; retry later",
                                retry_after=max(1.0, self.balancer.cooldown_left(views)),
                            )
                        views = []  # nothing usable and nothing tried: as if none were ready
                if views:  # every usable node is at capacity: wait for a slot
                    now = perf_counter()
                    if not queue_deadline:
                        if self.queue.full():
                            raise _queue_full(model, settings.retry_after_s)
                        queue_deadline = now + settings.queue_timeout_s
                        queued_since = now
                    remaining = queue_deadline - now
                    if remaining <= 0 or not await self.queue.wait(
                        model, remaining, front=front, flow=ex.flow, weight=ex.weight, place=place
                    ):
                        self.metrics.queue_wait(model, perf_counter() - queued_since)
                        raise _queue_full(model, settings.retry_after_s)
                    front = True
                    continue
            if tried:
                return None
            status = self.fleet.model_status(model)
            if status == "unknown":
                raise model_not_found(model)
            if status == "unservable":
                raise _no_capable_node(model, *self.fleet.incapable(model))
            now = perf_counter()
            if not ready_deadline:
                ready_deadline = now + settings.ready_wait_s
            remaining = ready_deadline - now
            if remaining <= 0:
                raise ApiError(
                    503,
                    "model_not_ready",
                    f"model '{model}' is not ready on any node yet ({status}); retry later",
                    retry_after=_NOT_READY_RETRY_AFTER_S,
                )
            await self.fleet.wait_for_change(remaining)

    async def _attempt(self, state: NodeState, ex: _Exchange) -> _Failure | None:
        """Send the request to ``state``'s node and relay its answer.

        Returns:
            ``None`` once an answer was relayed (or committed to), else a :class:`_Failure`
            for the caller to fail over or report (a failure of a request the node held, or a
            node's own 5xx, is not counted against it yet: the caller decides). Releases the
            node's slot in every case.
        """
        node_id = state.node_id
        model, request = ex.model, ex.request
        resp: Response | None = None
        ex.node = node_id
        try:
            client = self._client(state)
            sent = perf_counter()
            try:
                resp = await client.request(b"POST", ex.scope["path"], ex.body, ex.priority)
                status = resp.status
                if status >= 500 or status == 429:
                    payload = await resp.read()
                else:
                    payload = await resp.read_some()
            except ConnectError as exc:
                return self._failed(state, model, _CONNECT, exc)
            except UpstreamTimeout as exc:
                return self._failed(state, model, _TIMEOUT, exc, request)
            except UpstreamError as exc:
                return self._failed(state, model, _DISCONNECT, exc, request)
            got = perf_counter()
            headers = [item for item in resp.headers if item[0] not in _DROPPED_HEADERS]
            if status == 429:  # a busy node is not a failing one
                return _Failure(status, payload, headers, _BUSY)
            if status >= 500:
                self.metrics.error(node_id, model, _STATUS)
                return _Failure(status, payload, headers, _STATUS)
            self.balancer.record_success(state)  # any 2xx-4xx: the node works
            if ex.affinity_key is not None:
                self.balancer.remember(ex.affinity_key, node_id)
            headers.append((_NODE_HEADER, node_id.encode()))
            ex.sse = b"text/event-stream" in (resp.header(b"content-type") or b"")
            ex.started = True
            ex.status = status
            done = resp.at_eof()
            tap = None
            if ex.tap:
                tap = UsageTap(ex.sse, ex.strip_usage and ex.sse)
                if tap.strip:  # the relayed stream is shorter than the node's
                    headers = [h for h in headers if h[0] != b"content-length"]
                payload = tap.feed(payload)
                if done:
                    payload += tap.finish()
                    ex.usage = tap.usage
            if ex.rated is not None:
                headers += self.admission.headers(ex.rated)
            await ex.send({"type": "http.response.start", "status": status, "headers": headers})
            await ex.send({"type": "http.response.body", "body": payload, "more_body": not done})
            metrics = self.metrics
            metrics.request(node_id, model, status)
            metrics.ttfb(node_id, model, got - sent)
            metrics.overhead.observe((sent - ex.start) + (perf_counter() - got))
            if not done:
                resp.read_timeout = self.settings.stream_idle_timeout_s
                done = await self._relay(resp, ex, state, tap)
            if done:
                if self.poison:
                    self.poison.served(request)
                keys = ex.keys
                if keys and status < 400:  # the node answered: its cache holds the prompt
                    self.index.learn(node_id, model, keys, ex.generation)
                    use = ex.usage
                    reported = None if use is None else (use.prompt, use.cached)
                    metrics.prompt(node_id, model, keys[-1][1], ex.matched, reported)
            return None
        finally:
            if resp is not None:
                resp.release()
            state.outstanding -= 1
            if len(self.queue):
                self.queue.wake(model)

    async def _relay(
        self, resp: Response, ex: _Exchange, state: NodeState, tap: UsageTap | None = None
    ) -> bool:
        """Relay the rest of the body chunk by chunk (through ``tap`` when the usage is read);
        end SSE with an error event on failure.

        Returns:
            True when the whole answer was relayed.
        """
        send = ex.send
        try:
            if tap is None:
                async for chunk in resp:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                async for chunk in resp:
                    chunk = tap.feed(chunk)
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                rest = tap.finish()
                ex.usage = tap.usage
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
        except UpstreamError as exc:
            self.metrics.error(state.node_id, ex.model, "stream")
            # The node held the request when its stream broke: counted against it, unless
            # it is the second node this request broke (poison: counted against neither).
            culprits = self.poison.strike(ex.request, state.node_id)
            if culprits is None:
                self._blame(state, "stream", ex.request, exc)
            else:
                self._forgive(culprits, ex.request)
                self.metrics.error(state.node_id, ex.model, "poison")
                logger.warning("request poisoned nodes %s: refused", ", ".join(culprits))
            tail = b""
            if ex.sse:  # the stream ends with the error: no [DONE] after it
                message = f"node {state.node_id} failed mid-answer: {_describe(exc)}"
                tail = _sse_error(message, anthropic=ex.anthropic)
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return False
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    def _failed(
        self,
        state: NodeState,
        model: str,
        kind: str,
        exc: UpstreamError,
        request: int | None = None,
    ) -> _Failure:
        """Account a failed attempt on ``state`` (``kind``: connect, timeout, disconnect) and
        describe it for the client.

        A refused connection means nothing listens there: the node is cooled down at once and
        the fleet told to take it offline (its next heartbeat brings it back). A connect
        time-out counts against the node at once (the request never reached it); the router's
        own shortage of sockets counts against nothing. A failure of a request the node
        received (``held``) is left to the caller, which knows whether another node served it.
        """
        self.metrics.error(state.node_id, model, kind)
        if kind == _CONNECT:
            if self.balancer.record_failure(state, immediate=True):
                logger.warning("node %s cooled down: %s", state.node_id, _describe(exc))
            self.fleet.mark_node_offline(state.node_id)
            message = f"node {state.node_id} is unreachable"
            return _error_failure(502, "upstream_error", message, kind)
        held = exc.sent
        if not held and kind == _TIMEOUT:
            self._blame(state, kind, request, exc)
        if kind == _TIMEOUT:
            message = f"node {state.node_id} did not answer in time"
            return _error_failure(504, "upstream_timeout", message, kind, held)
        message = f"node {state.node_id} failed: {_describe(exc)}"
        return _error_failure(502, "upstream_error", message, kind, held)

    def _blame(
        self,
        state: NodeState,
        kind: str,
        request: int | None,
        exc: BaseException | None = None,
    ) -> None:
        """Count a failure against ``state`` (a cool-down at the threshold)."""
        if self.balancer.record_failure(state, request):
            logger.warning("node %s cooled down after %s: %s", state.node_id, kind, _describe(exc))

    def _forgive(self, node_ids: list[str], request: int) -> None:
        """Take back the failures of a poison ``request`` on ``node_ids``."""
        nodes = self.balancer.nodes
        for node_id in node_ids:
            state = nodes.get(node_id)
            if state is not None:
                self.balancer.forgive(state, request)

    def _suspect(self, state: NodeState) -> None:
        """``state``'s node answered 5xx: not counted (a request's content causes most), but
        health-checked (at most once per ``cooldown_s``); a failed check cools it down."""
        balancer = self.balancer
        now = balancer.now()
        if state.probing or not state.healthy or now < state.next_check:
            return
        state.next_check = now + self.settings.cooldown_s
        self._spawn(self._check(state))

    async def _check(self, state: NodeState) -> None:
        if await self._health(state) or self.balancer.nodes.get(state.node_id) is not state:
            return
        if self.balancer.record_failure(state, immediate=True):
            logger.warning(
                "node %s cooled down: it answers 5xx and fails its health check", state.node_id
            )

    # -- nodes ---------------------------------------------------------------------------

    def _client(self, state: NodeState) -> NodePool:
        """The node's connection pool: the open one for its URL and token, else a new one (an
        old one is closed)."""
        old = self._clients.get(state.node_id)
        if old is not None:
            if not old.closed and old.url == state.url and old.token == state.token:
                return old
            self._spawn(old.close())
        client = self._clients[state.node_id] = _node_pool(state, self.settings)
        return client

    def _probe_later(self, state: NodeState) -> None:
        self._spawn(self._probe(state))

    async def _probe(self, state: NodeState) -> None:
        """Health-probe a cooled-down node shortly before its cool-down ends (and again after
        each failed probe), so that a healthy node is back the moment the cool-down is over.

        Ends when a probe passed, or when the node left the fleet (offline or replaced): it is
        probed again when traffic finds it cooling.
        """
        balancer, settings = self.balancer, self.settings
        lead = min(settings.probe_timeout_s, settings.cooldown_s / 2)
        try:
            while balancer.nodes.get(state.node_id) is state and not state.healthy:
                if not self.fleet.node_online(state.node_id):
                    return
                delay = state.cooldown_until - lead - balancer.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                if await self._health(state):
                    balancer.probe_passed(state)
                    logger.info("node %s passed its health probe", state.node_id)
                    left = state.cooldown_until - balancer.now()
                    if left > 0:
                        await asyncio.sleep(left)
                    state.usable_at(balancer.now())
                    self.queue.wake_all()
                    return
                balancer.probe_failed(state)
        finally:
            state.probing = False

    async def _health(self, state: NodeState) -> bool:
        """``GET <node>/health`` answered 200 within ``probe_timeout_s``."""
        try:
            client = self._client(state)
            async with asyncio.timeout(self.settings.probe_timeout_s):
                resp = await client.request(b"GET", "/health")
                try:
                    await resp.read()
                finally:
                    resp.release()
                return resp.status == 200
        except (UpstreamError, TimeoutError):
            return False

    async def _watch_fleet(self) -> None:
        """On every fleet change: end the exchanges with nodes gone offline, and wake queued
        requests (a node may have capacity now)."""
        # The flag ends the loop even if a cancellation is swallowed (3.11's wait_for may
        # return the result instead of raising when both happen at once).
        while self._started:
            try:
                await self.fleet.wait_for_change(60.0)
                self._drop_offline()
            except Exception:  # a broken fleet view must not end the watcher
                logger.exception("waiting for fleet changes failed")
                await asyncio.sleep(1.0)
            self.queue.wake_all()

    def _drop_offline(self) -> None:
        """Abort every request in progress on a node the fleet no longer has online."""
        for node_id, client in list(self._clients.items()):
            if client.busy and not self.fleet.node_online(node_id):
                logger.warning("node %s went offline: ending its requests", node_id)
                client.abort_all(f"node {node_id} went offline")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _ClientWatch:
    """Cancels ``ex`` when its client disconnects.

    Granian's ``receive()`` returns a future: a callback on it costs a fraction of a task per
    request awaiting it. Any other awaitable (other ASGI servers, tests) runs as a task.
    """

    __slots__ = ("_receive", "_ex", "_waiter")

    def __init__(self, receive: Receive, ex: _Exchange) -> None:
        self._receive = receive
        self._ex = ex
        self._arm()

    def _arm(self) -> None:
        waiter: Any = self._receive()
        if not asyncio.isfuture(waiter):
            waiter = asyncio.ensure_future(waiter)
        self._waiter = waiter
        waiter.add_done_callback(self._done)

    def _done(self, waiter: Any) -> None:
        if waiter.cancelled() or self._ex.finished:
            return
        try:
            message = waiter.result()
        except Exception:  # the server failed the receive: nothing left to watch
            return
        if message["type"] == "http.disconnect":
            self._ex.cut("client_gone")
        else:
            self._arm()

    def close(self) -> None:
        """Stop watching (the request is over)."""
        if not self._waiter.done():
            self._waiter.cancel()


def _tokens_used(ex: _Exchange | None) -> int | None:
    """Tokens to settle a request's reservation with: the node's report; 0 when no node
    answered it successfully; ``None`` (the reservation stands) when an answer was cut
    without a report."""
    if ex is None or not ex.started or ex.status >= 400:
        return 0
    if ex.usage is not None:
        return ex.usage.total
    return None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "error status"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_headers(body: bytes, retry_after: float | None = None) -> list[tuple[bytes, bytes]]:
    headers = [_JSON_HEADER, (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    return headers


def _error_failure(status: int, code: str, message: str, kind: str, held: bool = False) -> _Failure:
    body = error_body(message, code, status)
    return _Failure(status, body, _error_headers(body), kind, held)


def _poison_message(ttl_s: float) -> str:
    return (
        "two nodes failed this request (connection lost or no answer in time), so it is not "
        f"sent to another node; the same request is refused for {ttl_s:g} s"
    )


def _poison_failure(ttl_s: float) -> _Failure:
    return _error_failure(502, "poison_request", _poison_message(ttl_s), "poison")


def _poison_error(ttl_s: float) -> ApiError:
    return ApiError(502, "poison_request", _poison_message(ttl_s))


async def _send_error(
    send: Send,
    exc: ApiError,
    anthropic: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = anthropic_errors.from_api_error(exc) if anthropic else exc.body()
    headers = _error_headers(body, exc.retry_after)
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _sse_error(
    message: str, code: str = "upstream_error", status: int = 502, anthropic: bool = False
) -> bytes:
    if anthropic:
        return anthropic_errors.sse_error(status, message)
    return b"data: " + error_body(message, code, status) + b"\n\n"


def _queue_full(model: str, retry_after: float) -> ApiError:
    message = f"every node serving '{model}' is at capacity; retry later"
    return ApiError(429, "too_many_requests", message, retry_after=retry_after)


def _no_capable_node(model: str, fmt: str | None, runtimes: list[str]) -> ApiError:
    seen = ", ".join(runtimes) or "none reported"
    message = (
        f"no node can serve '{model}': its format is {fmt or 'unknown'}, and the runtimes "
        f"of the nodes that hold it ({seen}) cannot serve that format"
    )
    return ApiError(503, "no_capable_node", message, retry_after=_NOT_READY_RETRY_AFTER_S)
