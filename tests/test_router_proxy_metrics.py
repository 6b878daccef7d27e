"""llmlb.router.proxy.metrics: each counter and histogram counts under its own labels (the
labelled children are cached per metric and label tuple)."""

from __future__ import annotations

from llmlb.router.proxy.metrics import ProxyMetrics
from prometheus_client import CollectorRegistry


def test_each_metric_counts_under_its_own_labels() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    for _ in range(2):
        metrics.request("n1", "m", 200)
        metrics.ttfb("n1", "m", 0.2)
        metrics.routed("m", "prefix")
        metrics.retry("n1", "m")
    metrics.request("n1", "m", 503)
    metrics.error("n1", "m", "connect")
    metrics.rejected(429)
    metrics.queue_wait("m", 0.5)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("llmlb_proxy_requests_total", node="n1", model="m", code="200") == 2
    assert value("llmlb_proxy_requests_total", node="n1", model="m", code="503") == 1
    assert value("llmlb_proxy_ttfb_seconds_count", node="n1", model="m") == 2
    assert value("llmlb_proxy_ttfb_seconds_sum", node="n1", model="m") == 0.4
    assert value("llmlb_proxy_routing_total", model="m", reason="prefix") == 2
    assert value("llmlb_proxy_retries_total", node="n1", model="m") == 2
    assert value("llmlb_proxy_errors_total", node="n1", model="m", kind="connect") == 1
    assert value("llmlb_proxy_rejected_total", code="429") == 1
    assert value("llmlb_proxy_queue_wait_seconds_count", model="m") == 1
