"""The inference proxy's tuning: :class:`ProxySettings`, each field settable by
``LLMLB_PROXY_<FIELD>`` or ``config.json``'s ``proxy``.

Apart from :mod:`.proxy` because the CLI and the router's settings read it without the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from llmlb import config


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Tuning of the inference proxy; each field may be set by ``LLMLB_PROXY_<FIELD>``.

    Attributes:
        connect_timeout_s: TCP connect to a node.
        first_byte_timeout_s: request sent until the node's first body bytes (a non-streaming
            answer arrives whole, so this bounds a whole generation).
        stream_idle_timeout_s: longest silence of a node between two pieces of an answer
            once its first bytes arrived; the stream then ends with an error event.
        total_timeout_s: longest time of a whole request in the router (0: no limit); the
            node request is cancelled then (504 before the first byte, else an error event),
            within a tenth of the limit (at most 1 s) after it passed.
        max_inflight: inference requests one worker takes at once (waiting ones included);
            beyond it, 503 ``overloaded`` with ``Retry-After`` at once.
        max_retries: other nodes tried after a failure before any byte reached the client.
        queue_max: requests that may wait for a free slot at once; beyond it, 429 at once.
        queue_timeout_s: longest wait for a free slot, then 429 with ``Retry-After``.
        ready_wait_s: longest wait for a model that is registered or being downloaded or
            loaded by a node, then 503 ``model_not_ready`` with ``Retry-After``.
        failure_threshold: time-outs, lost connections or cut streams of that many different
            requests since a node's last success cool it down.
        cooldown_s: a cooled-down node gets no traffic this long; it is health-probed shortly
            before the end (and again after each failed probe).
        probe_timeout_s: limit of the ``GET <node>/health`` probe.
        retry_after_s: ``Retry-After`` of 429 answers.
        max_body_bytes: largest request body (413 beyond); the router's own limit when hosted
            by the router.
        affinity_max_keys: ``user``/``X-Session-Id`` values remembered for affinity.
        poison_ttl_s: how long a request that two nodes lost or timed out on is refused
            (and a single such failure remembered).
        poison_max_keys: such requests remembered at most (oldest dropped first).
        routing: ``prefix`` (one cost for the prefill a node's cache saves and its load) or
            ``p2c`` (two random choices by requests in flight); ``LLMLB_ROUTING``, not
            ``LLMLB_PROXY_ROUTING`` (:func:`llmlb.config.routing`).
    """

    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 300.0
    stream_idle_timeout_s: float = 60.0
    total_timeout_s: float = 1800.0
    max_inflight: int = 2048
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
    poison_ttl_s: float = 600.0
    poison_max_keys: int = 4096
    routing: str = config.DEFAULT_ROUTING

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxySettings:
        """The settings from their ``asdict`` form (unknown keys are ignored)."""
        return config.settings_from_dict(cls, data)

    @classmethod
    def from_config(cls) -> ProxySettings:
        """Defaults overridden by ``LLMLB_PROXY_*`` env vars or ``config.json``'s ``proxy``.

        Raises:
            ValueError: a value does not parse as its field's type.
        """
        raw = config.proxy_overrides([f.name for f in fields(cls) if f.name != "routing"])
        values: dict[str, Any] = {"routing": config.routing()}
        for field in fields(cls):
            if field.name in raw:
                kind = int if type(field.default) is int else float
                value: Any = raw[field.name]  # JSON or text: the type's own parse says
                try:
                    values[field.name] = kind(value)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"proxy setting {field.name}: {exc}") from None
        return cls(**values)
