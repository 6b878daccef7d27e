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
  (:class:`~llmlb.router.proxy.poison.PoisonLog`): 502 ``poison_request`` to its client, counted
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

Modules: this one is the ASGI app (reading and parsing the body, admission of a limited
key, usage accounting, client and time-limit watches); :mod:`.forward` picks nodes, fails
over and relays answers; :mod:`.node_care` keeps the nodes' pools, probes and failure
counts; :mod:`.exchange` is one request's state; :mod:`.answers` shapes the router's own
errors; :mod:`.settings` holds :class:`ProxySettings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from time import perf_counter
from typing import Any

import orjson

from llmlb import anthropic_errors
from llmlb.asgi import Receive, Scope, Send
from llmlb.errors import ApiError, invalid_model_id, request_too_large
from llmlb.http import MAX_JSON_DEPTH, check_depth
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
from llmlb.router.proxy.answers import _error_headers, _send_error, _sse_error
from llmlb.router.proxy.balancer import Balancer
from llmlb.router.proxy.exchange import _ClientWatch, _Exchange, _tokens_used
from llmlb.router.proxy.forward import Forwarder
from llmlb.router.proxy.metrics import ProxyMetrics, default_metrics
from llmlb.router.proxy.node_care import Fleet
from llmlb.router.proxy.poison import PoisonLog
from llmlb.router.proxy.prefix_index import PrefixIndex
from llmlb.router.proxy.settings import ProxySettings
from llmlb.router.proxy.upstream import NodePool
from llmlb.router.proxy.usage import Usage, ask_for_usage
from llmlb.router.proxy.wait_queue import WaitQueue

logger = logging.getLogger(__name__)

_SESSION_HEADER = b"x-session-id"
_MAX_CACHED_IDS = 4096
# Routes whose prompts a node caches: their bodies get prefix keys (count_tokens and
# embeddings leave nothing in a cache worth routing to).
_KEYED_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}
)
_NO_USAGE = Usage()
# Where the router's app leaves the authenticated key (llmlb.router.control.keys.KeyEntry).
KEY_SCOPE = "llmlb.key"
# A request still in the router this long gets its client's disconnect watched: Granian's watch
# costs thread wake-ups per request, and a quicker answer has nothing to save by it.
_WATCH_AFTER_S = 0.1


class InferenceProxy(Forwarder):
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
        # Requests in flight, for _expire and _watch_clients.
        self._exchanges: set[_Exchange] = set()
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
            length = session = None
            for name, value in scope["headers"]:
                if name == b"content-length":
                    length = value
                elif name == _SESSION_HEADER and session is None:
                    session = value
            body = await self._read_body(
                receive, int(length) if length is not None and length.isdigit() else -1
            )
            if body is None:
                return  # the client went away
            model, affinity_key, keys, doc = self._parse(body, scope, session)
            entry = scope.get(KEY_SCOPE)
            limits = None if entry is None else entry.limits
            if entry is not None and limits is not None:
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
            ex.receive = receive  # watched by _watch_clients once it has been here a while
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
        :data:`_WATCH_AFTER_S` for its disconnect (checking that often: a look at each
        request in flight, where a queue of every request would cost each one more)."""
        while self._started:
            await asyncio.sleep(_WATCH_AFTER_S)
            oldest = perf_counter() - _WATCH_AFTER_S
            due = [
                ex
                for ex in self._exchanges
                if ex.receive is not None and ex.start <= oldest and not ex.finished
            ]
            for ex in due:
                receive, ex.receive = ex.receive, None
                assert receive is not None
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

    async def _read_body(self, receive: Receive, length: int = -1) -> bytes | None:
        """The request's body (``None``: the client went away); ``length``: its
        ``Content-Length`` (-1 unknown): a first message holding all of it ends the read
        without waiting for the server's empty last one."""
        limit = self.settings.max_body_bytes
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        if not message.get("more_body") or len(body) == length:
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
        self, body: bytes, scope: Scope, session: bytes | None = None
    ) -> tuple[str, str | None, PrefixKeys | None, dict[str, Any]]:
        """The normalised model id, the affinity key (``session``: the request's
        ``X-Session-Id``, else the body's ``user``), the prefix keys (prefix routing, routes
        whose prompts nodes cache), and the parsed body (admission of a limited key reads its
        ``max_tokens``)."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ApiError(400, "invalid_request_error", "request body is not valid JSON") from None
        if type(doc) is not dict:
            raise ApiError(400, "invalid_request_error", "request body must be a JSON object")
        if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH:  # else it cannot nest deeper
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
        if isinstance(model, ApiError):
            raise ApiError(model.status, model.code, model.message)
        keys = None
        if self.prefix and scope["path"] in _KEYED_PATHS:
            try:
                keys = request_keys(scope["path"], doc)
            except Exception:  # noqa: BLE001 - a body the node will refuse: route it anyhow
                keys = None
        if session is not None:
            return model, "s:" + session.decode("latin-1"), keys, doc
        user = doc.get("user")
        if type(user) is str and user:
            return model, "u:" + user, keys, doc
        return model, None, keys, doc
