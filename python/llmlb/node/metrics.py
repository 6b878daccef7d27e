"""Prometheus metrics of one node process (its own registry, exposed at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "NodeMetrics"]


class NodeMetrics:
    """Counters and histograms for downloads, loads, requests and tokens."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.downloads = Counter(
            "llmlb_node_downloads", "Model downloads finished, by result", ["result"], registry=r
        )
        self.download_bytes = Counter(
            "llmlb_node_download_bytes", "Bytes downloaded and verified", registry=r
        )
        self.download_seconds = Histogram(
            "llmlb_node_download_seconds",
            "Time to download and verify one model",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
            registry=r,
        )
        self.load_seconds = Histogram(
            "llmlb_node_model_load_seconds",
            "Time to load a model into llama.cpp",
            ["kind"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.requests = Counter(
            "llmlb_node_requests",
            "Inference requests, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "llmlb_node_tokens",
            "Tokens processed, by kind (prompt|completion)",
            ["kind"],
            registry=r,
        )
        self.active_requests = Gauge(
            "llmlb_node_active_requests", "Inference requests in progress", registry=r
        )
        self.loaded_models = Gauge(
            "llmlb_node_loaded_models", "Models resident in memory", registry=r
        )
        self.decode_batch = Histogram(
            "llmlb_node_decode_batch_sequences",
            "Sequences in one llama_decode step (continuous batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.decode_batch_peak = Gauge(
            "llmlb_node_decode_batch_sequences_peak",
            "Most sequences one llama_decode step has held since the node started",
            registry=r,
        )
        self.peak_batch = 0
        self.cached_tokens = Counter(
            "llmlb_node_cached_prompt_tokens",
            "Prompt tokens reused instead of evaluated, by where their cells came from "
            "(slot: still in the slot; ram: restored from the RAM prompt cache)",
            ["source"],
            registry=r,
        )
        self.prompt_cache_bytes = Gauge(
            "llmlb_node_prompt_cache_bytes", "Bytes of prompt states in the RAM cache", registry=r
        )
        self.prompt_cache_entries = Gauge(
            "llmlb_node_prompt_cache_entries", "Prompt states in the RAM cache", registry=r
        )
        self.prompt_cache_events = Counter(
            "llmlb_node_prompt_cache_events",
            "RAM prompt cache activity (save, restore, evict)",
            ["event"],
            registry=r,
        )
        self.stalled_steps = Counter(
            "llmlb_node_stalled_steps",
            "Decode steps the watchdog found running far longer than the model's usual step",
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
