"""The router's ASGI application: raw-ASGI inference dispatch, Starlette for the rest.

``create_app`` is the factory Granian runs in each worker (``--factory``). The inference
routes are matched on ``scope["path"]`` before any framework routing; their auth is one
in-memory lookup of the key's hash (``Authorization: Bearer`` or ``x-api-key``), then the
request goes to the ``InferenceProxy`` untouched. On the Anthropic routes
(``/v1/messages*``) the router's own errors are in Anthropic's shape.
"""

from __future__ import annotations

import gc
import logging
import os

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from llmlb import anthropic_errors, lifecycle
from llmlb.asgi import Receive, Scope, Send
from llmlb.errors import ApiError
from llmlb.http import api_error_handler, http_error_handler, server_error_handler, too_large
from llmlb.logs import configure_logging
from llmlb.router.api.metrics import HttpMetricsMiddleware
from llmlb.router.api.responses import unauthorized
from llmlb.router.api.routes import ROUTES
from llmlb.router.api.traffic import TrafficHistory
from llmlb.router.control.keys import UNAUTHENTICATED, permits
from llmlb.router.control.settings import RouterSettings
from llmlb.router.proxy.proxy import KEY_SCOPE, InferenceProxy
from llmlb.router.runtime import Runtime

logger = logging.getLogger("llmlb.router")

INFERENCE_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        *anthropic_errors.ANTHROPIC_PATHS,
    }
)


def _error_responder(
    exc: ApiError, extra_headers: dict[str, str] | None = None, *, anthropic: bool = False
):
    """Pre-render an error response as its two ASGI messages (in Anthropic's shape with
    ``anthropic``)."""
    headers = [(b"content-type", b"application/json")]
    more = {**exc.headers(), **(extra_headers or {})}
    headers += [(k.encode(), v.encode()) for k, v in more.items()]
    start = {"type": "http.response.start", "status": exc.status, "headers": headers}
    payload = anthropic_errors.from_api_error(exc) if anthropic else exc.body()
    body = {"type": "http.response.body", "body": payload}

    async def respond(send: Send) -> None:
        await send(start)
        await send(body)

    return respond


# (OpenAI shape, Anthropic shape)
_UNAUTHENTICATED = tuple(_error_responder(unauthorized(401), anthropic=a) for a in (False, True))
_FORBIDDEN = tuple(_error_responder(unauthorized(403), anthropic=a) for a in (False, True))
_METHOD_NOT_ALLOWED = tuple(
    _error_responder(
        ApiError(405, "method_not_allowed", "use POST for this route"),
        {"allow": "POST"},
        anthropic=a,
    )
    for a in (False, True)
)


class RouterApp:
    """The whole router as one ASGI callable.

    Args:
        settings: router settings; the ``InferenceProxy`` receives the same object.
    """

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.runtime = Runtime(settings)
        self.fleet = self.runtime.fleet
        # proxy.Fleet.ready_nodes says list[NodeLike], which list[NodeView] is not (lists are
        # invariant); a Sequence there would say what the proxy needs.
        self.proxy = InferenceProxy(
            self.fleet,  # type: ignore[arg-type]
            settings,
            index=self.runtime.index,
            admission=self.runtime.admission,
            on_usage=self.runtime.usage.add,
            lease=self.runtime.lease,
        )
        self._keys = self.runtime.keys
        self._max_body = settings.max_body_bytes
        self._too_large = tuple(
            _error_responder(too_large(settings.max_body_bytes), anthropic=a) for a in (False, True)
        )
        starlette = Starlette(
            routes=ROUTES,
            exception_handlers={
                ApiError: api_error_handler,
                HTTPException: http_error_handler,
                Exception: server_error_handler,
            },
        )
        starlette.state.runtime = self.runtime
        starlette.state.traffic = self.traffic = TrafficHistory(
            self.proxy.balancer, index=self.runtime.index
        )
        self._http = HttpMetricsMiddleware(starlette)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"] in INFERENCE_PATHS:
                if scope["method"] == "POST":
                    await self._inference(scope, receive, send)
                else:
                    anthropic = scope["path"] in anthropic_errors.ANTHROPIC_PATHS
                    await _METHOD_NOT_ALLOWED[anthropic](send)
            else:
                await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self._http(scope, receive, send)

    async def _inference(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = length = x_api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                length = value
            elif name == b"x-api-key":
                x_api_key = value
        anthropic = scope["path"] in anthropic_errors.ANTHROPIC_PATHS
        entry = self._keys.lookup(authorization, x_api_key)
        denied = UNAUTHENTICATED if entry is None else permits(entry, "api")
        if denied is not None:
            await (_FORBIDDEN if denied == 403 else _UNAUTHENTICATED)[anthropic](send)
            return
        scope[KEY_SCOPE] = entry  # the proxy admits by its limits and accounts its usage
        if length is not None and length.isdigit() and int(length) > self._max_body:
            await self._too_large[anthropic](send)
            return
        await self.proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.runtime.start()
                    await self.proxy.start()
                    await self.traffic.start()
                except Exception as exc:
                    logger.exception("router failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                # What start-up made lives as long as the worker: out of the collector's
                # generations, so that its collections walk only what requests leave behind.
                gc.freeze()
                logger.info("worker %d ready", os.getpid())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                logger.info("worker %d stopping", os.getpid())
                try:
                    await self.traffic.close()
                    await self.proxy.close()
                finally:
                    await self.runtime.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app() -> RouterApp:
    """Granian's factory: the settings ``llmlb router`` handed over (``llmlb.config``)."""
    lifecycle.die_with_parent()  # a worker never outlives `llmlb router`, even its SIGKILL
    configure_logging()
    return RouterApp(RouterSettings.for_worker())


__all__ = ["INFERENCE_PATHS", "RouterApp", "create_app"]
