"""The router's admin, node and model routes (everything but inference): the route table,
the public handlers and the per-method dispatch that writes the audit log.

Handlers by area: :mod:`.keys` (keys, usage, audit), :mod:`.models` (registry, manifests,
peer reports), :mod:`.nodes` (registration, heartbeats, cache reports, approval);
:mod:`.common` holds what they share.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmlb.http import JSONResponse
from llmlb.router.api import dashboard, metrics
from llmlb.router.api.openapi import openapi_schema
from llmlb.router.api.routes.common import Endpoint, _guard
from llmlb.router.api.routes.keys import (
    AUDITED,
    _audit,
    audit_actor,
    audit_log,
    create_key,
    delete_key,
    list_keys,
    update_key,
    usage_report,
    usage_self,
)
from llmlb.router.api.routes.models import (
    delete_model,
    get_model,
    list_models,
    manifest,
    node_models,
    register_model,
    report_peer,
    retry_model,
)
from llmlb.router.api.routes.nodes import (
    approve_node,
    list_nodes,
    node_cache,
    node_heartbeat,
    register_node,
    revoke_node,
    traffic,
    unregister_node,
)

# -- public -------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    """``GET /health``: liveness, no auth."""
    return JSONResponse({"status": "ok"})


async def openapi(request: Request) -> Response:
    """``GET /openapi.json`` (any valid key)."""
    _guard(request, None)
    return JSONResponse(openapi_schema())


async def metrics_route(request: Request) -> Response:
    """``GET /metrics`` (admin): Prometheus text."""
    _guard(request, "admin")
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


def _by_method(**handlers: Endpoint) -> tuple[Endpoint, list[str]]:
    """One endpoint serving several methods, so a wrong method gets 405 with a full ``Allow``."""

    async def dispatch(request: Request) -> Response:
        method = request.method.lower()
        handler = handlers["get"] if method == "head" else handlers[method]
        request.scope["llmlb.handler"] = handler.__name__
        actor = audit_actor(request) if handler.__name__ in AUDITED else ""
        response = await handler(request)
        if handler.__name__ in AUDITED and 200 <= response.status_code < 300:
            await _audit(request, AUDITED[handler.__name__], actor, response)
        return response

    return dispatch, [method.upper() for method in handlers]


def _route(path: str, **handlers: Endpoint) -> Route:
    endpoint, methods = _by_method(**handlers)
    return Route(path, endpoint, methods=methods)


ROUTES = [
    _route("/health", get=health),
    _route("/openapi.json", get=openapi),
    _route("/metrics", get=metrics_route),
    _route("/v0/keys", get=list_keys, post=create_key),
    _route("/v0/keys/{key_id}", delete=delete_key, patch=update_key),
    _route("/v1/models/register", post=register_model),
    _route("/v1/models", get=list_models),
    _route("/v1/models/{model_id:path}", get=get_model, delete=delete_model),
    _route("/v0/models", get=node_models),
    _route("/v0/models/registry/{model_id:path}/manifest.json", get=manifest),
    _route("/v0/models/{model_id:path}/retry", post=retry_model),
    _route("/v0/peers/report", post=report_peer),
    _route("/v0/nodes", get=list_nodes, post=register_node),
    _route("/v0/nodes/{node_id}/heartbeat", post=node_heartbeat),
    _route("/v0/nodes/{node_id}/cache", post=node_cache),
    _route("/v0/nodes/{node_id}/approve", post=approve_node),
    _route("/v0/nodes/{node_id}/revoke", post=revoke_node),
    _route("/v0/nodes/{node_id}", delete=unregister_node),
    _route("/v0/traffic", get=traffic),
    _route("/v0/usage", get=usage_report),
    _route("/v0/usage/self", get=usage_self),
    _route("/v0/audit", get=audit_log),
    _route("/dashboard", get=dashboard.dashboard_page),
    _route("/dashboard/{name}", get=dashboard.dashboard_file),
]
