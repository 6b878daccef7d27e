"""Unit tests of ``llmlb.router.api.traffic``: the dashboard's short traffic history."""

from __future__ import annotations

import asyncio

import pytest
from llmlb.router.api.traffic import Counts, Snapshot, TrafficHistory, parse_samples, quantile
from llmlb.router.control.fleet import NodeView
from llmlb.router.proxy.balancer import Balancer
from llmlb.router.proxy.metrics import ProxyMetrics
from prometheus_client import CollectorRegistry


def samples(registry: CollectorRegistry) -> Snapshot:
    return parse_samples(s for family in registry.collect() for s in family.samples)


def test_quantiles_interpolate_inside_the_bucket():
    buckets = {0.1: 0.0, 0.2: 10.0, 0.5: 10.0, float("inf"): 10.0}
    assert quantile(0.5, buckets) == pytest.approx(0.15)
    assert quantile(0.95, buckets) == pytest.approx(0.195)
    assert quantile(0.5, {float("inf"): 0.0}) is None
    assert quantile(0.5, {}) is None
    # Everything beyond the last finite bound: the bound itself, as Prometheus does.
    assert quantile(0.5, {1.0: 0.0, float("inf"): 4.0}) == 1.0


def test_the_proxy_counters_fold_into_pairs():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.request("n1", "m1", 200)
    metrics.request("n1", "m1", 400)  # a 4xx answer is an error the client sees
    metrics.ttfb("n1", "m1", 0.03)
    metrics.error("n2", "m1", "connect")
    metrics.error("n2", "m1", "client_gone")  # a client hanging up is not an error
    metrics.rejected(503)
    snap = samples(registry)
    assert snap.rejected == 1
    assert snap.pairs[("n1", "m1")].requests == 2
    assert snap.pairs[("n1", "m1")].errors == 1
    assert snap.pairs[("n1", "m1")].ttfb[0.05] == 1 and snap.pairs[("n1", "m1")].ttfb[0.025] == 0
    assert snap.pairs[("n2", "m1")].errors == 1 and snap.pairs[("n2", "m1")].requests == 0


def test_history_keeps_differences_per_interval_grouped_by_model_and_node():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    balancer = Balancer()
    state = balancer.state(NodeView("n1", "http://127.0.0.1:1", 2))
    state.outstanding = 1
    history = TrafficHistory(balancer, read=lambda: samples(registry), interval_s=2, window_s=6)
    history.sample()  # baseline: what happened before is not history
    metrics.request("n1", "m1", 200)
    metrics.request("n2", "m1", 200)
    metrics.ttfb("n1", "m1", 0.2)
    history.sample()
    history.sample()  # a quiet interval
    metrics.rejected(404)
    history.sample()
    data = history.to_dict()
    assert data["interval_s"] == 2 and len(data["t"]) == 3
    assert data["total"]["requests"] == [2, 0, 0]
    assert data["total"]["errors"] == [0, 0, 1] and data["total"]["rejected"] == [0, 0, 1]
    assert data["models"]["m1"]["requests"] == [2, 0, 0]
    assert data["nodes"]["n1"]["requests"] == [1, 0, 0]
    assert data["nodes"]["n2"]["requests"] == [1, 0, 0]
    assert 0.1 < data["nodes"]["n1"]["ttfb_p50_s"][0] <= 0.25
    assert data["nodes"]["n1"]["ttfb_p50_s"][1:] == [None, None]
    assert data["balancer"] == {"n1": {"cooled_down": False, "outstanding": 1}}
    # The window holds window_s / interval_s intervals; older ones fall out.
    history.sample()
    assert history.to_dict()["total"]["requests"] == [0, 0, 0]


def test_a_counter_that_went_backwards_counts_from_zero():
    now = Counts(requests=3, errors=0, ttfb={float("inf"): 3})
    assert now.minus(Counts(requests=10, ttfb={float("inf"): 10})) is now
    assert now.minus(Counts(requests=1, ttfb={float("inf"): 1})).requests == 2


def test_sampling_runs_in_the_background_and_stops():
    snapshots = iter(Snapshot(rejected=n) for n in range(1000))

    async def scenario() -> dict:
        history = TrafficHistory(read=lambda: next(snapshots), interval_s=0.01, window_s=1)
        await history.start()
        while len(history.to_dict()["t"]) < 3:
            await asyncio.sleep(0.01)
        await history.close()
        return history.to_dict()

    data = asyncio.run(scenario())
    assert data["total"]["rejected"][:3] == [1, 1, 1]
