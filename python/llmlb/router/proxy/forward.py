"""Forwarding one request: a node picked (or a wait for one, within bounds), the request
sent, failover before the first byte, and the answer relayed chunk by chunk (its usage read
on the way, a broken stream ended with an error event).

Apart from :mod:`.proxy` (the ASGI app: reading, admission, time limits) because it is the
data path to the nodes; :class:`Forwarder` builds on :class:`~.node_care.NodeCare`.
"""

from __future__ import annotations

import logging
from time import perf_counter

from llmlb import anthropic_errors
from llmlb.errors import ApiError, model_not_found
from llmlb.router.proxy.admission import Admission
from llmlb.router.proxy.answers import (
    _NOT_READY_RETRY_AFTER_S,
    _describe,
    _no_capable_node,
    _poison_error,
    _poison_failure,
    _queue_full,
    _sse_error,
)
from llmlb.router.proxy.balancer import NodeState, NoPick
from llmlb.router.proxy.exchange import (
    _BUSY,
    _CONNECT,
    _DISCONNECT,
    _STATUS,
    _TIMEOUT,
    _Exchange,
    _Failure,
)
from llmlb.router.proxy.node_care import NodeCare
from llmlb.router.proxy.poison import PoisonLog
from llmlb.router.proxy.prefix_index import PrefixIndex
from llmlb.router.proxy.upstream import ConnectError, Response, UpstreamError, UpstreamTimeout
from llmlb.router.proxy.usage import UsageTap
from llmlb.router.proxy.wait_queue import WaitPlace

logger = logging.getLogger("llmlb.router.proxy.proxy")  # one name for the proxy's log

_NODE_HEADER = b"x-llmlb-node"


class Forwarder(NodeCare):
    """The proxy's forwarding of one request; :class:`~.proxy.InferenceProxy` sets the state
    declared here."""

    poison: PoisonLog
    index: PrefixIndex
    admission: Admission

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
            headers = resp.relayed  # without hop-by-hop headers; this answer's own list
            if status == 429:  # a busy node is not a failing one
                return _Failure(status, payload, headers, _BUSY)
            if status >= 500:
                self.metrics.error(node_id, model, _STATUS)
                return _Failure(status, payload, headers, _STATUS)
            self.balancer.record_success(state)  # any 2xx-4xx: the node works
            if ex.affinity_key is not None:
                self.balancer.remember(ex.affinity_key, node_id)
            headers.append((_NODE_HEADER, node_id.encode()))
            # find(), not `in`: bytes' `in` first tries its argument as an int (an exception).
            ex.sse = resp.content_type.find(b"text/event-stream") >= 0
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
