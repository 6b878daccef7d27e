"""The node's ASGI application: OpenAI routes, health, readiness, metrics and model sync.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``POST /v1/responses`` (:mod:`llmlb.node.responses_api`), ``POST /v1/messages`` and
``POST /v1/messages/count_tokens`` (:mod:`llmlb.node.anthropic_api`, Anthropic-shaped
errors), ``GET /v1/models`` (ready models), ``GET /health``, ``GET /ready`` (200 once the first sync
pass finished), ``GET /metrics``, ``POST /api/models/sync`` (router's sync token),
``GET /api/models/status``, ``GET|HEAD /v0/peer/files/{model_id}/{filename}`` (other nodes
of the fleet, :mod:`llmlb.node.peer`). Errors are OpenAI-shaped (``llmlb.errors``).

With ``require_key`` set (``--require-key`` / ``LLMLB_NODE_REQUIRE_KEY``) or
``require_router_token`` (``--router-auth``, on by default off loopback), every ``/v1/*``
route answers 401 ``invalid_api_key`` unless ``Authorization: Bearer`` (or ``x-api-key``)
carries that key or the router's token for this node (the proxy sends it with every
forwarded request).

Start-up stays short: llama.cpp (``llama_cpp``) is imported in a background thread when the
app is created, so ``/ready`` never waits for it while the first request finds it loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llmlb import anthropic_errors, config, lifecycle
from llmlb.errors import ApiError
from llmlb.http import (
    JSONResponse,
    api_error_handler,
    api_key,
    error_response,
    http_error_handler,
    model_id_or_400,
    read_json,
)
from llmlb.logs import configure_logging
from llmlb.model_storage import ModelStorage
from llmlb.node import anthropic_api, responses_api
from llmlb.node.download.options import DownloadOptions
from llmlb.node.engine import Engine, EngineOptions
from llmlb.node.identity import node_id as persistent_node_id
from llmlb.node.metrics import CONTENT_TYPE_LATEST, NodeMetrics
from llmlb.node.peer import PeerService, TransferStats
from llmlb.node.peer import routes as peer_routes
from llmlb.node.resolver import Resolver, RouterAccess
from llmlb.node.settings import NodeSettings
from llmlb.node.sync import RouterSync
from llmlb.protocol import ModelState, transfer_totals

logger = logging.getLogger(__name__)


class Node:
    """The node's components wired together (one per server process)."""

    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self.metrics = NodeMetrics()
        models_dir = settings.models_dir
        models_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStorage(str(models_dir))
        router = (
            RouterAccess(settings.router_url, settings.api_key) if settings.router_url else None
        )
        self.engine = Engine(
            self.store,
            self.metrics,
            EngineOptions(
                max_loaded=settings.max_loaded,
                concurrency=settings.concurrency,
                queue_timeout_s=settings.queue_timeout_s,
                n_ctx=settings.n_ctx,
                max_tokens=settings.max_tokens,
                threads=settings.threads,
                threads_batch=settings.threads_batch,
            ),
            template_lookup=lambda model_id: self.resolver.template_for(model_id),
        )
        self.resolver = Resolver(
            self.store,
            models_dir,
            router,
            self.metrics,
            allowed_hosts=list(settings.allowed_hosts),
            token=settings.hf_token,
            options=DownloadOptions(connections=settings.connections),
            on_change=lambda: self.sync.kick(),
            after_download=self.engine.load,
            store_all=settings.store_all,
            fleet=lambda: (self.sync.node_id, self.sync.peer_token),
            peer_fetch=settings.peer_fetch,
            stats=TransferStats(self.metrics.registry),
        )
        self.node_id = persistent_node_id(models_dir, settings.url)
        self.gpu = GpuProbe()
        self.sync = RouterSync(
            settings, self.node_id, self.resolver, self.engine, gpu=self.gpu.result
        )
        self.peer = PeerService(
            self.resolver,
            lambda: self.sync.peer_token,
            settings.peer_upload_mbps,
            self.resolver.stats,
        )

    async def start(self) -> None:
        """Start syncing with the router (in the background)."""
        await self.sync.start()

    async def stop(self) -> None:
        """Stop syncing, cancel downloads, unload models."""
        await self.sync.close()
        await self.resolver.close()
        await self.engine.close()


class GpuProbe:
    """Import llama.cpp and ask it about GPU offload, in a background thread started at once.

    The import costs a noticeable part of a second; doing it off the start-up path keeps
    ``/ready`` fast, and the first inference request finds the module already imported.
    """

    def __init__(self) -> None:
        self._future: Future[dict[str, Any]] = Future()
        threading.Thread(target=self._probe, name="llama-import", daemon=True).start()

    def _probe(self) -> None:
        try:
            from llmlb.node.engine import gpu_offload_supported

            gpu = gpu_offload_supported()
            info = {"backend": ("metal" if sys.platform == "darwin" else "cuda") if gpu else "cpu"}
        except Exception as exc:  # noqa: BLE001 - reported as CPU; loading will say more
            logger.warning("llama.cpp probe failed: %s", exc)
            info = {"backend": "cpu"}
        self._future.set_result(info)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The registration's ``gpu`` object (blocks until the probe finished)."""
        return self._future.result(timeout)


# --- handlers ----------------------------------------------------------------------------


@functools.cache
def _body_limit() -> int:
    """``LLMLB_MAX_BODY_BYTES`` (default 1 MiB): the router's limit, so whatever the router
    forwards fits."""
    return config.router_max_body_bytes()


async def _body(request: Request) -> dict:
    """The JSON object body (400 when malformed, 413 ``request_too_large`` above the limit)."""
    return await read_json(request, _body_limit())


def _model_id(body: dict) -> str:
    raw = body.get("model")
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, "invalid_request_error", "'model' is required")
    return model_id_or_400(raw)


def _check_key(node: Node, request: Request) -> None:
    """Enforce ``require_key`` / ``require_router_token`` on a ``/v1/*`` request.

    Raises:
        ApiError: 401 ``invalid_api_key`` when a credential is required and not presented
            (any header bytes, non-ASCII included, are just a wrong credential).
    """
    settings = node.settings
    if not settings.require_key and not settings.require_router_token:
        return
    authorization = request.headers.get("authorization")
    if settings.require_router_token and node.sync.check_sync_token(authorization):
        return
    token = api_key(authorization, request.headers.get("x-api-key"))
    if (
        settings.require_key
        and token is not None
        and hmac.compare_digest(token, settings.require_key.encode())
    ):
        return
    raise ApiError(401, "invalid_api_key", "missing or invalid API key for this node")


def _check_off_loopback(node: Node, request: Request) -> None:
    """Status and metrics routes: open on loopback, the router's token or the node's key off it.

    Raises:
        ApiError: 401 ``invalid_api_key``.
    """
    if node.settings.require_router_token:
        _check_key(node, request)


def _anthropic_error(exc: ApiError) -> Response:
    """An error of the Anthropic routes, in Anthropic's shape."""
    body = anthropic_errors.from_api_error(exc)
    return Response(body, exc.status, exc.headers(), media_type="application/json")


def _inference(route: str, method: str | Callable[..., Any], errors=error_response):
    """A handler running ``method`` (an engine method's name, or a dialect's function taking
    the engine first); ``errors`` renders the errors it answers with."""

    async def handler(request: Request) -> Response:
        node: Node = request.app.state.node
        status = 200
        try:
            _check_key(node, request)
            body = await _body(request)
            model_id = _model_id(body)
            path = await node.resolver.serving_path(model_id)
            run = (
                getattr(node.engine, method)
                if isinstance(method, str)
                else functools.partial(method, node.engine)
            )
            result = await _unless_disconnected(request, run(model_id, path, body))
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
    try:
        _check_key(node, request)
    except ApiError as exc:
        return error_response(exc)
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
    try:
        _check_off_loopback(node, request)
    except ApiError as exc:
        return error_response(exc)
    return Response(node.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def models_sync(request: Request) -> Response:
    """``POST /api/models/sync``: the router names changed models; reconcile in background."""
    node: Node = request.app.state.node
    if not node.sync.check_sync_token(request.headers.get("authorization")):
        return error_response(ApiError(401, "invalid_api_key", "missing or invalid sync token"))
    try:
        body = await _body(request)
        models = body.get("models")
        action = body.get("action", "register")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ApiError(400, "invalid_request_error", "'models' must be a list of ids")
        models = [model_id_or_400(m, param="models") for m in models]
        if action not in ("register", "delete", "retry"):
            raise ApiError(
                400, "invalid_request_error", "'action' must be 'register', 'delete' or 'retry'"
            )
    except ApiError as exc:
        return error_response(exc)
    node.sync.handle_sync(action, models)
    return JSONResponse({"accepted": models, "action": action}, status_code=202)


async def models_status(request: Request) -> Response:
    """``GET /api/models/status``: per-model state and progress (off loopback: the router's
    token or the node key)."""
    node: Node = request.app.state.node
    try:
        _check_off_loopback(node, request)
    except ApiError as exc:
        return error_response(exc)
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
            Route("/v1/chat/completions", _inference("chat", "chat"), methods=["POST"]),
            Route("/v1/completions", _inference("completions", "complete"), methods=["POST"]),
            Route("/v1/embeddings", _inference("embeddings", "embed"), methods=["POST"]),
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
