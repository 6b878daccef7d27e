"""Declaring Prometheus metrics in one registry, one line each (node and router alike)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Declare:
    """Makes metrics registered in ``registry``.

    Args:
        registry: where every metric made here is registered.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, help: str, *labels: str) -> Counter:
        """A counter (``_total`` is appended to ``name`` in the exposition)."""
        return Counter(name, help, labels, registry=self.registry)

    def gauge(self, name: str, help: str, *labels: str) -> Gauge:
        """A gauge."""
        return Gauge(name, help, labels, registry=self.registry)

    def histogram(self, name: str, help: str, *labels: str, buckets: Sequence[float]) -> Histogram:
        """A histogram with ``buckets``."""
        return Histogram(name, help, labels, buckets=buckets, registry=self.registry)
