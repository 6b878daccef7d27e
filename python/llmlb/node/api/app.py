"""The node's ASGI application: OpenAI routes, health, readiness, metrics and model sync.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``POST /v1/responses`` (:mod:`llmlb.node.api.responses`), ``POST /v1/messages`` and
``POST /v1/messages/count_tokens`` (:mod:`llmlb.node.api.anthropic`, Anthropic-shaped
errors), ``GET /v1/models`` (ready models), ``GET /health``, ``GET /ready`` (200 once the first sync
pass finished), ``GET /metrics``, ``POST /api/models/sync`` (router's sync token),
``GET /api/models/status``, ``GET|HEAD /v0/peer/files/{model_id}/{filename}`` (other nodes
of the fleet, :mod:`llmlb.node.models.peers`). Errors are OpenAI-shaped (``llmlb.errors``).

Routes only: who may call them is :mod:`llmlb.node.api.auth`, the parts behind them are
:class:`llmlb.node.service.Node`. An :class:`ApiError` a route raises is answered by
:func:`llmlb.http.api_error_handler` (the inference routes answer their own, to count them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llmlb import anthropic_errors, lifecycle
from llmlb.errors import ApiError, invalid_api_key
from llmlb.http import (
    JSONResponse,
    api_error_handler,
    error_response,
    http_error_handler,
    model_id_or_400,
    read_json,
)
from llmlb.logs import configure_logging
from llmlb.node.api import anthropic as anthropic_api
from llmlb.node.api import openai_response as openai_api
from llmlb.node.api import responses as responses_api
from llmlb.node.api.auth import check_key, check_off_loopback
from llmlb.node.inference.cache_directory import request_origin
from llmlb.node.inference.scheduler import request_priority
from llmlb.node.metrics import CONTENT_TYPE_LATEST
from llmlb.node.models.peers import routes as peer_routes
from llmlb.node.service import Node
from llmlb.node.settings import NodeSettings
from llmlb.prefix_keys import request_keys
from llmlb.protocol import ModelState, SyncNotice, transfer_totals

logger = logging.getLogger(__name__)


# --- handlers ----------------------------------------------------------------------------


async def _body(request: Request) -> dict:
    """The JSON object body (400 when malformed, 413 ``request_too_large`` above the limit:
    the router's, read once at start, so whatever the router forwards fits)."""
    node: Node = request.app.state.node
    return await read_json(request, node.settings.max_body_bytes)


def _model_id(body: dict) -> str:
    raw = body.get("model")
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, "invalid_request_error", "'model' is required")
    return model_id_or_400(raw)


def _anthropic_error(exc: ApiError) -> Response:
    """An error of the Anthropic routes, in Anthropic's shape."""
    body = anthropic_errors.from_api_error(exc)
    return Response(body, exc.status, exc.headers(), media_type="application/json")


def _inference(route: str, method: Callable[..., Any], errors=error_response):
    """A handler running ``method``, a dialect's function (engine, model id, path, body):
    it parses the body into the typed contract, runs it, renders the answer; ``errors``
    renders the errors it answers with."""

    async def handler(request: Request) -> Response:
        node: Node = request.app.state.node
        status = 200
        try:
            check_key(node, request)
            body = await _body(request)
            request_origin.set((request.url.path, request_keys(request.url.path, body)))
            request_priority.set(request.headers.get("x-llmlb-priority"))
            model_id = _model_id(body)
            path = await node.resolver.serving_path(model_id)
            work = method(node.engine, model_id, path, body)
            result = await _unless_disconnected(request, work)
        except ApiError as exc:
            status = exc.status
            return errors(exc)
        except _ClientGone:
            status = 499
            return Response(status_code=499)
        except Exception:  # noqa: BLE001 - answered in the error shape, logged with an id
            status = 500
            request_id = secrets.token_hex(8)
            logger.exception("%s: unexpected error (request %s)", route, request_id)
            return errors(
                ApiError(500, "internal_error", f"unexpected error (request id {request_id})")
            )
        finally:
            node.metrics.requests.labels(route, str(status)).inc()
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(
            _guard(result), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return handler


class _ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await ``work`` unless the client disconnects first (then cancel it: a generation
    whose client left stops at its next decode step, a queued one never starts)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise _ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return when the client's connection closes (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _guard(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the models this node can serve now."""
    node: Node = request.app.state.node
    check_key(node, request)
    now = int(time.time())
    reports = node.sync.model_reports()
    ids = sorted(r["id"] for r in reports if r["state"] == ModelState.READY and r.get("servable"))
    data = [{"id": i, "object": "model", "created": now, "owned_by": "llmlb"} for i in ids]
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> Response:
    """``GET /health``: the process is up."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """``GET /ready``: 200 once the first sync pass finished."""
    node: Node = request.app.state.node
    if node.sync.ready.is_set():
        return JSONResponse(
            {"status": "ready", "node_id": node.sync.node_id, "registered": node.sync.registered}
        )
    not_ready = ApiError(503, "not_ready", "initial model sync still running", retry_after=1)
    return error_response(not_ready)


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text (off loopback: the router's token or the node key)."""
    node: Node = request.app.state.node
    check_off_loopback(node, request)
    return Response(node.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def models_sync(request: Request) -> Response:
    """``POST /api/models/sync``: the router names changed models; reconcile in background."""
    node: Node = request.app.state.node
    if not node.sync.check_sync_token(request.headers.get("authorization")):
        return error_response(invalid_api_key("sync token"))
    notice = SyncNotice.parse(await _body(request))
    node.sync.handle_sync(notice.action, notice.models)
    return JSONResponse({"accepted": notice.models, "action": notice.action}, status_code=202)


async def models_status(request: Request) -> Response:
    """``GET /api/models/status``: per-model state and progress (off loopback: the router's
    token or the node key)."""
    node: Node = request.app.state.node
    check_off_loopback(node, request)
    reports = node.sync.model_reports()
    loaded = set(node.engine.loaded())
    for report in reports:
        report["loaded"] = report["id"] in loaded
    return JSONResponse(
        {
            "node_id": node.sync.node_id,
            "models": reports,
            "active_requests": node.engine.active_requests(),
            "transfer": transfer_totals(reports),
        }
    )


def create_app(settings: NodeSettings) -> Starlette:
    """Build the node's ASGI app for ``settings``."""
    node = Node(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await node.start()
        try:
            yield
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await node.stop()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _inference("chat", openai_api.chat), methods=["POST"]),
            Route(
                "/v1/completions", _inference("completions", openai_api.complete), methods=["POST"]
            ),
            Route("/v1/embeddings", _inference("embeddings", openai_api.embed), methods=["POST"]),
            Route(
                "/v1/responses", _inference("responses", responses_api.create), methods=["POST"]
            ),
            Route(
                "/v1/messages",
                _inference("messages", anthropic_api.create, _anthropic_error),
                methods=["POST"],
            ),
            Route(
                "/v1/messages/count_tokens",
                _inference("count_tokens", anthropic_api.count_tokens, _anthropic_error),
                methods=["POST"],
            ),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/api/models/sync", models_sync, methods=["POST"]),
            Route("/api/models/status", models_status, methods=["GET"]),
            *peer_routes(lambda request: request.app.state.node.peer),
        ],
        exception_handlers={HTTPException: http_error_handler, ApiError: api_error_handler},
        lifespan=lifespan,
    )
    app.state.node = node
    return app


def app_from_env() -> Starlette:
    """Granian factory: the app for the settings ``llmlb node`` put in the environment."""
    lifecycle.die_with_parent()  # a worker never outlives `llmlb node`, even its SIGKILL
    configure_logging()
    return create_app(NodeSettings.from_env())
