"""Prometheus metrics of one node process (its own registry, exposed at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llmlb.prometheus import Declare

__all__ = ["CONTENT_TYPE_LATEST", "NodeMetrics"]


class NodeMetrics:
    """Counters and histograms for downloads, loads, requests and tokens."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        m = Declare(self.registry)
        self.downloads = m.counter(
            "llmlb_node_downloads", "Model downloads finished, by result", "result"
        )
        self.download_bytes = m.counter(
            "llmlb_node_download_bytes", "Bytes downloaded and verified"
        )
        self.download_seconds = m.histogram(
            "llmlb_node_download_seconds",
            "Time to download and verify one model",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
        )
        self.load_seconds = m.histogram(
            "llmlb_node_model_load_seconds",
            "Time to load a model into llama.cpp",
            "kind",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.requests = m.counter(
            "llmlb_node_requests", "Inference requests, by route and status", "route", "status"
        )
        self.tokens = m.counter(
            "llmlb_node_tokens", "Tokens processed, by kind (prompt|completion)", "kind"
        )
        self.active_requests = m.gauge(
            "llmlb_node_active_requests", "Inference requests in progress"
        )
        self.loaded_models = m.gauge("llmlb_node_loaded_models", "Models resident in memory")
        self.decode_batch = m.histogram(
            "llmlb_node_decode_batch_sequences",
            "Sequences in one llama_decode step (continuous batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.decode_batch_peak = m.gauge(
            "llmlb_node_decode_batch_sequences_peak",
            "Most sequences one llama_decode step has held since the node started",
        )
        self.peak_batch = 0
        self.cached_tokens = m.counter(
            "llmlb_node_cached_prompt_tokens",
            "Prompt tokens reused instead of evaluated, by where their cells came from "
            "(slot: still in the slot; ram: restored from the RAM prompt cache)",
            "source",
        )
        self.prompt_cache_bytes = m.gauge(
            "llmlb_node_prompt_cache_bytes", "Bytes of prompt states in the RAM cache"
        )
        self.prompt_cache_entries = m.gauge(
            "llmlb_node_prompt_cache_entries", "Prompt states in the RAM cache"
        )
        self.prompt_cache_events = m.counter(
            "llmlb_node_prompt_cache_events",
            "RAM prompt cache activity (save, restore, evict)",
            "event",
        )
        self.stalled_steps = m.counter(
            "llmlb_node_stalled_steps",
            "Decode steps the watchdog found running far longer than the model's usual step",
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
