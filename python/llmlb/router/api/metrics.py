"""Prometheus exposition for ``GET /metrics``, single- or multi-process.

Router metrics live in ``prometheus_client``'s default registry. With several workers the
CLI sets ``PROMETHEUS_MULTIPROC_DIR`` and every worker's samples are merged at scrape time.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from llmlb import config
from llmlb.asgi import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter(
    "llmlb_router_http_requests_total",
    "Requests to the router's non-inference routes, by handler and status.",
    ["handler", "method", "status"],
)


def render() -> tuple[bytes, str]:
    """The current metrics in Prometheus text format, and its content type."""
    directory = config.prometheus_multiproc_dir()
    if directory is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class HttpMetricsMiddleware:
    """Counts responses of the wrapped ASGI app by handler name, method and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            handler = scope.get("llmlb.handler", "unmatched")
            HTTP_REQUESTS.labels(handler=handler, method=scope["method"], status=str(status)).inc()
