"""What the proxy does for the nodes behind it: a keep-alive pool per node, health probes
of cooled-down nodes and health checks of nodes answering 5xx, failures counted against a
node (or forgiven: poison), and requests ended when the fleet takes a node offline.

Apart from :mod:`.forward` (one request's attempts) because it is about the nodes' health
across requests; :class:`NodeCare` is the base the proxy builds on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from llmlb.router.proxy.answers import _describe, _error_failure
from llmlb.router.proxy.balancer import Balancer, NodeLike, NodeState
from llmlb.router.proxy.exchange import _CONNECT, _TIMEOUT, _Failure
from llmlb.router.proxy.metrics import ProxyMetrics
from llmlb.router.proxy.settings import ProxySettings
from llmlb.router.proxy.upstream import NodePool, UpstreamError
from llmlb.router.proxy.wait_queue import WaitQueue

logger = logging.getLogger("llmlb.router.proxy.proxy")  # one name for the proxy's log


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


class NodeCare:
    """The proxy's care of its nodes; :class:`~.proxy.InferenceProxy` sets the state
    declared here."""

    fleet: Fleet
    settings: ProxySettings
    metrics: ProxyMetrics
    balancer: Balancer
    queue: WaitQueue
    _clients: dict[str, NodePool]
    _tasks: set[asyncio.Task]
    _started: bool

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
