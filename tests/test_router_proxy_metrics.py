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


def test_histograms_bucket_as_prometheus_client_does_and_counters_add_amounts() -> None:
    """The cached fast paths (a value's own ``inc``, a bisection into the buckets) give the
    samples prometheus_client's ``observe``/``inc`` give, bounds themselves included."""
    from llmlb.router.proxy.metrics import _LATENCY_BUCKETS, _OVERHEAD_BUCKETS
    from prometheus_client import Histogram

    registry, reference = CollectorRegistry(), CollectorRegistry()
    metrics = ProxyMetrics(registry)
    ttfb = Histogram("ttfb", "", ["node", "model"], buckets=_LATENCY_BUCKETS, registry=reference)
    overhead = Histogram("overhead", "", buckets=_OVERHEAD_BUCKETS, registry=reference)
    amounts = [0.0, 1e-6, *_LATENCY_BUCKETS, *_OVERHEAD_BUCKETS, 0.003, 0.07, 45.0, 1e9]
    for amount in amounts:
        metrics.ttfb("n1", "m", amount)
        ttfb.labels("n1", "m").observe(amount)
        metrics.overhead.observe(amount)
        overhead.observe(amount)
    metrics.prompt("n1", "m", 120, 80, (30, 20))
    metrics.prompt("n1", "m", 50, 0, None)

    def samples(reg: CollectorRegistry, name: str) -> dict:
        return {
            (s.name.removeprefix(name), tuple(sorted(s.labels.items()))): s.value
            for family in reg.collect()
            if family.name == name
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(registry, "llmlb_proxy_ttfb_seconds") == samples(reference, "ttfb")
    assert samples(registry, "llmlb_proxy_overhead_seconds") == samples(reference, "overhead")
    assert len(samples(reference, "ttfb")) == len(_LATENCY_BUCKETS) + 1 + 2  # +Inf, count, sum

    def value(name: str) -> float | None:
        return registry.get_sample_value(name, {"node": "n1", "model": "m"})

    assert value("llmlb_proxy_prompt_chars_total") == 170
    assert value("llmlb_proxy_predicted_cached_chars_total") == 80
    assert value("llmlb_proxy_reported_prompt_tokens_total") == 30
    assert value("llmlb_proxy_reported_cached_tokens_total") == 20
