"""Prometheus metrics of the inference proxy, cheap on the hot path.

Labelled children are looked up once per label tuple and cached in plain dicts as their
value's own ``inc`` (a histogram: its sum's and its buckets'), so a proxied request costs a
few dict lookups and lock-guarded additions, not three Python frames of checks per
``inc``/``observe``; the values are prometheus_client's own (multiprocess ones included), so
what a scrape shows is unchanged. Gauges that mirror the balancer's state (outstanding
requests, cool-downs, queue length) are computed at scrape time by a collector, costing the
hot path nothing.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmlb.prometheus import Declare
from llmlb.router.proxy.balancer import Balancer
from llmlb.router.proxy.wait_queue import WaitQueue

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
)  # fmt: skip


def _adder(child: Any) -> Callable[[float], None]:
    """``child.inc`` (a labelled counter), without its per-call checks where its value is
    reachable (the checks only refuse what the proxy never does: negative amounts, unlabelled
    parents)."""
    value = getattr(child, "_value", None)
    inc = getattr(value, "inc", None)
    return inc if callable(inc) else child.inc


class _Observer:
    """``child.observe`` (a labelled histogram) as a bisection into its bucket values; the
    child's own ``observe`` where they are not reachable."""

    __slots__ = ("observe", "_sum", "_bounds", "_buckets")

    def __init__(self, child: Any) -> None:
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(getattr(child, "_sum", None), "inc", None)
        if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
            self.observe: Callable[[float], None] = child.observe
            return
        self._sum = total
        self._bounds = list(bounds)  # the last is +Inf: every amount lands in a bucket
        self._buckets = [bucket.inc for bucket in buckets]
        self.observe = self._observe

    def _observe(self, amount: float) -> None:
        self._sum(amount)
        self._buckets[bisect_left(self._bounds, amount)](1)


class ProxyMetrics:
    """The proxy's counters and histograms, registered in ``registry``.

    Metrics (all prefixed ``llmlb_proxy_``): ``requests_total{node,model,code}`` (answers relayed
    from a node), ``errors_total{node,model,kind}`` (kind: connect, timeout, disconnect, status,
    stream, client_gone), ``retries_total{node,model}`` (failovers away from ``node``),
    ``rejected_total{code}`` (answered by the router itself: 400/404/413/429/502/503),
    ``queue_wait_seconds{model}``, ``ttfb_seconds{node,model}`` (request sent to first body
    bytes from the node), ``overhead_seconds`` (the router's own time on a request, excluding the
    wait for the node), and gauges ``outstanding{node}``, ``node_cooling{node}``, ``queued``,
    ``inflight``. Error kinds also include ``poison`` (a second node refused the request with a
    5xx, or lost it or timed out on it: counted against neither; with ``node=""``, a poison
    request refused without reaching a node), ``client_gone`` and ``total_timeout``.

    Prefix-aware routing: ``routing_total{model,reason}`` (why the balancer chose a node:
    ``prefix``, ``load``, ``affinity``, ``fallback``;
    see :data:`llmlb.router.proxy.balancer.REASONS`),
    ``prompt_chars_total{node,model}`` (prompt characters of the keyed requests a node
    answered) and ``predicted_cached_chars_total{node,model}`` (how many of them the index said
    the node's cache held), beside ``reported_prompt_tokens_total{node,model}`` and
    ``reported_cached_tokens_total{node,model}`` (what the node's usage said it took from its
    cache for the same requests: the predicted share against the reported one), and the gauge
    ``prefix_keys{node}`` (keys the index holds for a node).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = REGISTRY if registry is None else registry
        m = Declare(registry)
        self._requests = m.counter(
            "llmlb_proxy_requests", "Responses relayed from nodes.", "node", "model", "code"
        )
        self._errors = m.counter(
            "llmlb_proxy_errors", "Failed attempts on nodes.", "node", "model", "kind"
        )
        self._retries = m.counter(
            "llmlb_proxy_retries", "Failovers away from a node.", "node", "model"
        )
        self._rejected = m.counter(
            "llmlb_proxy_rejected", "Requests answered by the router itself.", "code"
        )
        self._queue_wait = m.histogram(
            "llmlb_proxy_queue_wait_seconds",
            "Time requests waited for a free slot.",
            "model",
            buckets=_LATENCY_BUCKETS,
        )
        self._ttfb = m.histogram(
            "llmlb_proxy_ttfb_seconds",
            "Time from sending a request to a node to its first body bytes.",
            "node",
            "model",
            buckets=_LATENCY_BUCKETS,
        )
        self._routing = m.counter(
            "llmlb_proxy_routing",
            "Nodes chosen, by why (prefix, load, affinity, fallback).",
            "model",
            "reason",
        )
        self._prompt_chars = m.counter(
            "llmlb_proxy_prompt_chars",
            "Prompt characters of the keyed requests a node answered.",
            "node",
            "model",
        )
        self._cached_chars = m.counter(
            "llmlb_proxy_predicted_cached_chars",
            "Prompt characters the prefix index predicted a node's cache held.",
            "node",
            "model",
        )
        self._reported_prompt = m.counter(
            "llmlb_proxy_reported_prompt_tokens",
            "Prompt tokens of the keyed requests a node answered, as the node reported them.",
            "node",
            "model",
        )
        self._reported_cached = m.counter(
            "llmlb_proxy_reported_cached_tokens",
            "Of those, the tokens the node reported it took from its cache.",
            "node",
            "model",
        )
        self.overhead_histogram = m.histogram(
            "llmlb_proxy_overhead_seconds",
            "Router's own time per request, excluding the wait for the node.",
            buckets=_OVERHEAD_BUCKETS,
        )
        self.overhead = _Observer(self.overhead_histogram)  # its observe(): per request
        self._registry = registry
        self._collector: Collector | None = None
        self._children: dict[tuple, Any] = {}

    def _inc(self, metric: Counter, *labels: str) -> Callable[[float], None]:
        """The cached adder of ``metric``'s child for ``labels``."""
        key = (id(metric), *labels)
        inc = self._children.get(key)
        if inc is None:
            inc = self._children[key] = _adder(metric.labels(*labels))
        return inc

    def _observer(self, metric: Histogram, *labels: str) -> Callable[[float], None]:
        """The cached ``observe`` of ``metric``'s child for ``labels``."""
        key = (id(metric), *labels)
        observe = self._children.get(key)
        if observe is None:
            observe = self._children[key] = _Observer(metric.labels(*labels)).observe
        return observe

    def request(self, node: str, model: str, code: int) -> None:
        """Count one answer relayed from ``node``."""
        key = ("r", node, model, code)
        inc = self._children.get(key)
        if inc is None:
            inc = self._children[key] = _adder(self._requests.labels(node, model, str(code)))
        inc(1)

    def ttfb(self, node: str, model: str, seconds: float) -> None:
        """Observe a time to first byte."""
        self._observer(self._ttfb, node, model)(seconds)

    def error(self, node: str, model: str, kind: str) -> None:
        """Count a failed attempt on ``node``."""
        self._inc(self._errors, node, model, kind)(1)

    def retry(self, node: str, model: str) -> None:
        """Count a failover away from ``node``."""
        self._inc(self._retries, node, model)(1)

    def rejected(self, code: int) -> None:
        """Count a request the router answered itself with ``code``."""
        self._inc(self._rejected, str(code))(1)

    def routed(self, model: str, reason: str) -> None:
        """Count a node chosen for ``reason``."""
        self._inc(self._routing, model, reason)(1)

    def prompt(
        self,
        node: str,
        model: str,
        chars: int,
        cached: int,
        reported: tuple[int, int] | None = None,
    ) -> None:
        """Count a keyed prompt of ``chars`` characters ``node`` answered, ``cached`` of which
        the index predicted its cache held, and the node's own ``reported`` (prompt tokens,
        cached tokens) when its answer carried usage."""
        key = ("p", node, model)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = tuple(
                _adder(metric.labels(node, model))
                for metric in (
                    self._prompt_chars,
                    self._cached_chars,
                    self._reported_prompt,
                    self._reported_cached,
                )
            )
        children[0](chars)
        if cached:
            children[1](cached)
        if reported is not None and reported[0]:
            children[2](reported[0])
            if reported[1]:
                children[3](reported[1])

    def queue_wait(self, model: str, seconds: float) -> None:
        """Observe the time a request waited for a free slot."""
        self._observer(self._queue_wait, model)(seconds)

    def watch(
        self, balancer: Balancer, queue: WaitQueue, inflight: Callable[[], int] | None = None
    ) -> None:
        """Export ``balancer``'s and ``queue``'s state (and the requests in flight) as gauges,
        computed at scrape time."""
        self.unwatch()
        self._collector = _StateCollector(lambda: balancer, lambda: queue, inflight)
        self._registry.register(self._collector)

    def unwatch(self) -> None:
        """Stop exporting the state gauges."""
        if self._collector is not None:
            self._registry.unregister(self._collector)
            self._collector = None


class _StateCollector(Collector):
    def __init__(
        self,
        balancer: Callable[[], Balancer],
        queue: Callable[[], WaitQueue],
        inflight: Callable[[], int] | None = None,
    ):
        self._balancer = balancer
        self._queue = queue
        self._inflight = inflight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        outstanding = GaugeMetricFamily(
            "llmlb_proxy_outstanding", "Requests in flight per node.", labels=["node"]
        )
        cooling = GaugeMetricFamily(
            "llmlb_proxy_node_cooling", "1 while a node is cooled down.", labels=["node"]
        )
        balancer = self._balancer()
        for state in list(balancer.nodes.values()):
            outstanding.add_metric([state.node_id], state.outstanding)
            cooling.add_metric([state.node_id], 0 if state.healthy else 1)
        yield outstanding
        yield cooling
        if balancer.index is not None:
            keys = GaugeMetricFamily(
                "llmlb_proxy_prefix_keys",
                "Prefix keys the index holds for a node (reported or guessed).",
                labels=["node"],
            )
            for node_id, stats in balancer.index.stats().items():
                keys.add_metric([node_id], stats["keys"])
            yield keys
        yield GaugeMetricFamily(
            "llmlb_proxy_queued", "Requests waiting for a free slot.", value=len(self._queue())
        )
        if self._inflight is not None:
            yield GaugeMetricFamily(
                "llmlb_proxy_inflight",
                "Inference requests this worker has in flight (max_inflight bounds it).",
                value=self._inflight(),
            )


_default: ProxyMetrics | None = None


def default_metrics() -> ProxyMetrics:
    """The process-wide metrics in the default registry (created once)."""
    global _default
    if _default is None:
        _default = ProxyMetrics()
    return _default
