"""The inference proxy: raw ASGI, forwards a request's original bytes to a ready node.

For ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` (the router
checks the key's ``api`` scope first), the proxy reads only the body's ``model`` (and ``user``),
normalises the id, lets the :class:`~llmlb.router.balancer.Balancer` pick a node that reports
the model ready, sends the unchanged body there over a pooled keep-alive connection
(:mod:`llmlb.router.upstream`) and relays the answer chunk by chunk. Before any byte reached
the client, a connect error, a first-byte timeout, a dropped connection or a 5xx (or a node's
429) moves the request to another node (at most ``max_retries`` more); afterwards a failure
ends an SSE stream with an OpenAI-shaped error event.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, fields, replace
from time import perf_counter
from typing import Any, Protocol

import orjson

from llmlb import config
from llmlb.errors import ApiError, error_body
from llmlb.model_storage import normalize_model_id
from llmlb.router.balancer import Balancer, NodeLike, NodeState, NoPick, WaitQueue
from llmlb.router.proxy_metrics import ProxyMetrics, default_metrics
from llmlb.router.upstream import (
    ConnectError,
    NodePool,
    Response,
    UpstreamError,
    UpstreamTimeout,
)

logger = logging.getLogger(__name__)

Scope = dict[str, Any]

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
_NOT_READY_RETRY_AFTER_S = 5.0


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Tuning of the inference proxy; each field may be set by ``LLMLB_PROXY_<FIELD>``.

    Attributes:
        connect_timeout_s: TCP connect to a node.
        first_byte_timeout_s: request sent until the node's first body bytes (a non-streaming
            answer arrives whole, so this bounds a whole generation); also the longest silence
            of a node in the middle of a streamed answer. There is no total time limit.
        max_retries: other nodes tried after a failure before any byte reached the client.
        queue_max: requests that may wait for a free slot at once; beyond it, 429 at once.
        queue_timeout_s: longest wait for a free slot, then 429 with ``Retry-After``.
        ready_wait_s: longest wait for a model that is registered or being downloaded or
            loaded by a node, then 503 ``model_not_ready`` with ``Retry-After``.
        failure_threshold: consecutive failures that cool a node down.
        cooldown_s: a cooled-down node gets no traffic this long, then is health-probed.
        probe_timeout_s: limit of the ``GET <node>/health`` probe.
        retry_after_s: ``Retry-After`` of 429 answers.
        max_body_bytes: largest request body (413 beyond); the router's own limit when hosted
            by the router.
        affinity_max_keys: ``user``/``X-Session-Id`` values remembered for affinity.
    """

    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 300.0
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

    @classmethod
    def from_config(cls) -> ProxySettings:
        """Defaults overridden by ``LLMLB_PROXY_*`` env vars or ``config.json``'s ``proxy``.

        Raises:
            ValueError: a value does not parse as its field's type.
        """
        raw = config.proxy_overrides([f.name for f in fields(cls)])
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name in raw:
                kind = int if type(field.default) is int else float
                try:
                    values[field.name] = kind(raw[field.name])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"proxy setting {field.name}: {exc}") from None
        return cls(**values)


class Fleet(Protocol):
    """What the proxy needs of :class:`llmlb.router.fleet.FleetView`."""

    def ready_nodes(self, model_id: str) -> list[NodeLike]: ...

    def model_status(self, model_id: str) -> str: ...

    async def wait_for_change(self, timeout: float) -> None: ...

    def mark_node_offline(self, node_id: str) -> None: ...


def _node_pool(state: NodeState, settings: ProxySettings) -> NodePool:
    """A keep-alive connection pool to ``state``'s node, presenting the node's token."""
    return NodePool(
        state.url,
        token=state.token,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.first_byte_timeout_s,  # first byte, then each silence
        keepalive_s=30.0,
    )


@dataclass(slots=True)
class _Failure:
    """What the client gets if no other node can take the request."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]


class InferenceProxy:
    """Raw ASGI app forwarding OpenAI inference requests to ready nodes.

    Args:
        fleet: the in-memory view of nodes and models (:class:`llmlb.router.fleet.FleetView`).
        settings: a :class:`ProxySettings`; anything else (the router's settings, ``None``)
            means :meth:`ProxySettings.from_config`, taking ``max_body_bytes`` from it if set.
        metrics: where to count; by default the process-wide metrics in the default registry.
    """

    def __init__(self, fleet: Fleet, settings: Any = None, *, metrics: ProxyMetrics | None = None):
        self.fleet = fleet
        if isinstance(settings, ProxySettings):
            self.settings = settings
        else:
            self.settings = ProxySettings.from_config()
            if limit := getattr(settings, "max_body_bytes", None):
                self.settings = replace(self.settings, max_body_bytes=limit)
        self.metrics = metrics or default_metrics()
        self.balancer = Balancer(
            failure_threshold=self.settings.failure_threshold,
            cooldown_s=self.settings.cooldown_s,
            affinity_max_keys=self.settings.affinity_max_keys,
            on_probe_due=self._probe_later,
        )
        self.queue = WaitQueue(self.settings.queue_max)
        self._clients: dict[str, NodePool] = {}
        self._model_ids: dict[str, str | ApiError] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started = False

    async def start(self) -> None:
        """Start background work (fleet watcher, state gauges); call at lifespan start."""
        if self._started:
            return
        self._started = True
        self.metrics.watch(self.balancer, self.queue)
        self._spawn(self._watch_fleet())

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

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        start = perf_counter()
        try:
            body = await self._read_body(receive)
            if body is None:
                return  # the client went away
            model, affinity_key = self._parse(body, scope)
            await self._forward(scope, receive, send, body, model, affinity_key, start)
        except ApiError as exc:
            self.metrics.rejected(exc.status)
            await _send_error(send, exc)

    # -- request -------------------------------------------------------------------------

    async def _read_body(self, receive: Any) -> bytes | None:
        limit = self.settings.max_body_bytes
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > limit:
                raise _too_large(limit)
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
                raise _too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    def _parse(self, body: bytes, scope: Scope) -> tuple[str, str | None]:
        """The normalised model id and the affinity key; nothing else of the body is used."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ApiError(400, "invalid_request_error", "request body is not valid JSON") from None
        if type(doc) is not dict:
            raise ApiError(400, "invalid_request_error", "request body must be a JSON object")
        raw = doc.get("model")
        if type(raw) is not str:
            raise ApiError(400, "invalid_request_error", "'model' is required and must be a string")
        model = self._model_ids.get(raw)
        if model is None:
            try:
                model = normalize_model_id(raw)
            except ValueError as exc:
                model = ApiError(400, "invalid_model_id", str(exc))
            if len(self._model_ids) >= _MAX_CACHED_IDS:
                self._model_ids.clear()
            self._model_ids[raw] = model
        if type(model) is not str:
            raise ApiError(model.status, model.code, model.message)
        for name, value in scope["headers"]:
            if name == _SESSION_HEADER:
                return model, "s:" + value.decode("latin-1")
        user = doc.get("user")
        if type(user) is str and user:
            return model, "u:" + user
        return model, None

    # -- forwarding ----------------------------------------------------------------------

    async def _forward(
        self,
        scope: Scope,
        receive: Any,
        send: Any,
        body: bytes,
        model: str,
        affinity_key: str | None,
        start: float,
    ) -> None:
        tried: list[str] = []
        failure: _Failure | None = None
        for _ in range(1 + self.settings.max_retries):
            state = await self._acquire(model, affinity_key, tried)
            if state is None:
                break
            if failure is not None:
                self.metrics.retry(tried[-1], model)
            tried.append(state.node_id)
            failure = await self._attempt(
                state, scope, receive, send, body, model, affinity_key, start
            )
            if failure is None:
                return
        assert failure is not None  # the first _acquire returns a node or raises
        self.metrics.rejected(failure.status)
        headers = failure.headers
        await send({"type": "http.response.start", "status": failure.status, "headers": headers})
        await send({"type": "http.response.body", "body": failure.body})

    async def _acquire(
        self, model: str, affinity_key: str | None, tried: list[str]
    ) -> NodeState | None:
        """Take a slot on a node ready for ``model``, waiting within the configured bounds.

        Returns:
            The node, or ``None`` on a retry when no untried node is left.

        Raises:
            ApiError: 404 unknown model; 503 not ready in time, or every node cooling down;
                429 when the wait queue is full or the wait for a slot timed out.
        """
        settings = self.settings
        ready_deadline = queue_deadline = queued_since = 0.0
        front = False
        while True:
            views = self.fleet.ready_nodes(model)
            if views:
                if front or not self.queue.has_waiters(model):
                    pick = self.balancer.pick(views, affinity_key, tried)
                    if type(pick) is NodeState:
                        pick.outstanding += 1
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
                    if remaining <= 0 or not await self.queue.wait(model, remaining, front=front):
                        self.metrics.queue_wait(model, perf_counter() - queued_since)
                        raise _queue_full(model, settings.retry_after_s)
                    front = True
                    continue
            if tried:
                return None
            status = self.fleet.model_status(model)
            if status == "unknown":
                raise ApiError(404, "model_not_found", f"model '{model}' is not registered")
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

    async def _attempt(
        self,
        state: NodeState,
        scope: Scope,
        receive: Any,
        send: Any,
        body: bytes,
        model: str,
        affinity_key: str | None,
        start: float,
    ) -> _Failure | None:
        """Send the request to ``state``'s node and relay its answer.

        Returns:
            ``None`` once an answer was relayed (or committed to), else a :class:`_Failure`
            for the caller to fail over or report. Releases the node's slot in every case.
        """
        node_id = state.node_id
        resp: Response | None = None
        try:
            client = self._clients.get(node_id)
            if client is None or client.url != state.url or client.token != state.token:
                client = self._client(state)
            sent = perf_counter()
            try:
                resp = await client.request(b"POST", scope["path"], body)
                status = resp.status
                if status >= 500 or status == 429:
                    payload = await resp.read()
                else:
                    payload = await resp.read_some()
            except ConnectError as exc:
                return self._failed(state, model, "connect", exc)
            except UpstreamTimeout as exc:
                return self._failed(state, model, "timeout", exc)
            except UpstreamError as exc:
                return self._failed(state, model, "disconnect", exc)
            got = perf_counter()
            headers = [item for item in resp.headers if item[0] not in _DROPPED_HEADERS]
            if status >= 500 or status == 429:
                if status != 429:  # a busy node is not a failing one
                    self._failed(state, model, "status", None)
                return _Failure(status, payload, headers)
            self.balancer.record_success(state)
            if affinity_key is not None:
                self.balancer.remember(affinity_key, node_id)
            headers.append((_NODE_HEADER, node_id.encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            done = resp.at_eof()
            await send({"type": "http.response.body", "body": payload, "more_body": not done})
            metrics = self.metrics
            metrics.request(node_id, model, status)
            metrics.ttfb(node_id, model, got - sent)
            metrics.overhead.observe((sent - start) + (perf_counter() - got))
            if not done:
                await self._relay(resp, receive, send, state, model)
            return None
        finally:
            if resp is not None:
                resp.release()
            state.outstanding -= 1
            if len(self.queue):
                self.queue.wake(model)

    async def _relay(
        self, resp: Response, receive: Any, send: Any, state: NodeState, model: str
    ) -> None:
        """Relay the rest of the body chunk by chunk; end SSE with an error event on failure.

        When the client disconnects, the node connection is closed, which stops the relay and
        tells the node to stop generating.
        """
        watcher = asyncio.get_running_loop().create_task(_close_on_disconnect(receive, resp))
        try:
            async for chunk in resp:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            if watcher.done() and not watcher.cancelled() and watcher.result():
                self.metrics.error(state.node_id, model, "client_gone")
                return
            self._failed(state, model, "stream", exc)
            tail = b""
            if b"text/event-stream" in (resp.header(b"content-type") or b""):
                tail = _sse_error(f"node {state.node_id} failed mid-answer: {_describe(exc)}")
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return
        finally:
            watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _failed(
        self, state: NodeState, model: str, kind: str, exc: BaseException | None
    ) -> _Failure:
        """Account a failed attempt on ``state`` (``kind``: connect, timeout, disconnect,
        status, stream) and describe it for the client.

        A refused connection means nothing listens there: the node is cooled down at once and
        the fleet told to take it offline (its next heartbeat brings it back).
        """
        self.metrics.error(state.node_id, model, kind)
        immediate = kind == "connect"
        if self.balancer.record_failure(state, immediate=immediate):
            logger.warning("node %s cooled down after %s: %s", state.node_id, kind, _describe(exc))
        if immediate:
            self.fleet.mark_node_offline(state.node_id)
            return _error_failure(502, "upstream_error", f"node {state.node_id} is unreachable")
        if kind == "timeout":
            message = f"node {state.node_id} did not answer in time"
            return _error_failure(504, "upstream_timeout", message)
        message = f"node {state.node_id} failed: {_describe(exc)}"
        return _error_failure(502, "upstream_error", message)

    # -- nodes ---------------------------------------------------------------------------

    def _client(self, state: NodeState) -> NodePool:
        old = self._clients.get(state.node_id)
        if old is not None:
            self._spawn(old.close())
        client = self._clients[state.node_id] = _node_pool(state, self.settings)
        return client

    def _probe_later(self, state: NodeState) -> None:
        self._spawn(self._probe(state))

    async def _probe(self, state: NodeState) -> None:
        """``GET <node>/health``: a 200 puts a cooled-down node back into service."""
        ok = False
        try:
            client = self._clients.get(state.node_id)
            if client is None or client.url != state.url or client.token != state.token:
                client = self._client(state)
            async with asyncio.timeout(self.settings.probe_timeout_s):
                resp = await client.request(b"GET", "/health")
                try:
                    await resp.read()
                finally:
                    resp.release()
                ok = resp.status == 200
        except (UpstreamError, TimeoutError):
            ok = False
        finally:
            self.balancer.probe_finished(state, ok)
        if ok:
            logger.info("node %s passed its health probe: back in service", state.node_id)
            self.queue.wake_all()

    async def _watch_fleet(self) -> None:
        """Wake queued requests whenever the fleet changes (a node may have capacity now)."""
        # The flag ends the loop even if a cancellation is swallowed (3.11's wait_for may
        # return the result instead of raising when both happen at once).
        while self._started:
            try:
                await self.fleet.wait_for_change(60.0)
            except Exception:  # a broken fleet view must not end the watcher
                logger.exception("waiting for fleet changes failed")
                await asyncio.sleep(1.0)
            self.queue.wake_all()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _close_on_disconnect(receive: Any, resp: Response) -> bool:
    """Close the node's response when the client disconnects; True if it did."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            resp.close()
            return True


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


def _error_failure(status: int, code: str, message: str) -> _Failure:
    body = error_body(message, code, status)
    return _Failure(status, body, _error_headers(body))


async def _send_error(send: Any, exc: ApiError) -> None:
    body = exc.body()
    headers = _error_headers(body, exc.retry_after)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _sse_error(message: str) -> bytes:
    return b"data: " + error_body(message, "upstream_error", 502) + b"\n\n"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"request body exceeds {limit} bytes")


def _queue_full(model: str, retry_after: float) -> ApiError:
    message = f"every node serving '{model}' is at capacity; retry later"
    return ApiError(429, "too_many_requests", message, retry_after=retry_after)
