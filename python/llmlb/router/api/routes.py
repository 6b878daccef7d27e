"""Handlers of the router's admin, node and model routes (everything but inference)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from urllib.parse import unquote

import orjson
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmlb.errors import ApiError, key_not_found, model_already_registered, model_not_found
from llmlb.http import JSONResponse, api_key, model_id_or_400
from llmlb.model_storage import normalize_model_id
from llmlb.prefix_keys import CacheReport, CacheReportError
from llmlb.protocol import (
    APPROVAL_FIELD,
    Heartbeat,
    HeartbeatAnswer,
    PeerReport,
    Registration,
    RegistrationAnswer,
    validate_node_id,
)
from llmlb.router import db
from llmlb.router.api import dashboard, metrics
from llmlb.router.api.openapi import openapi_schema
from llmlb.router.api.responses import (  # control bodies: no NUL
    BODY_SCOPE,
    authorize,
    read_json,
    unauthorized,
)
from llmlb.router.control import audit, keys, nodes, peers, registry, usage
from llmlb.router.control.keys import KeyEntry
from llmlb.router.control.limits import parse_limits
from llmlb.router.proxy.admission import period_start
from llmlb.router.proxy.prefix_index import MAX_REPORT_BYTES, ReportResult
from llmlb.router.runtime import Runtime

logger = logging.getLogger("llmlb.router")

Endpoint = Callable[[Request], Awaitable[Response]]

REGISTRATIONS = Counter(
    "llmlb_router_model_registrations_total", "Model registrations by result code.", ["result"]
)
CACHE_REPORTS = Counter(
    "llmlb_router_cache_reports_total",
    "Nodes' cache reports by result (snapshot, delta, resync, invalid, refused).",
    ["result"],
)


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _guard(request: Request, scope: str | None) -> Runtime:
    runtime = _runtime(request)
    authorize(request, runtime.keys, scope)
    return runtime


def _path_model_id(request: Request) -> str:
    # Accept ``org/name`` and ``org%2Fname`` alike, whether or not the server decoded the path.
    return model_id_or_400(unquote(request.path_params["model_id"]))


def _bearer(request: Request) -> bytes | None:
    return api_key(request.headers.get("authorization"), request.headers.get("x-api-key"))


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


# -- keys ----------------------------------------------------------------------------------


async def create_key(request: Request) -> Response:
    """``POST /v0/keys`` (admin): returns the new key once."""
    runtime = _guard(request, "admin")
    body = await read_json(request, runtime.settings.max_body_bytes)
    scope, name, fields = keys.read_key_body(body, creating=True)
    limits = parse_limits(fields)  # every field checked before anything is written
    assert scope is not None  # read_key_body checked it
    info, key = await runtime.db.run(keys.create_key, scope, name, limits)
    await runtime.refresh()
    return JSONResponse({**info.to_dict(), "key": key}, status_code=201)


async def update_key(request: Request) -> Response:
    """``PATCH /v0/keys/{key_id}`` (admin): change a key's name and limits (``null`` removes
    a limit); answers the key as ``GET /v0/keys`` shows it."""
    runtime = _guard(request, "admin")
    key_id = request.path_params["key_id"]
    body = await read_json(request, runtime.settings.max_body_bytes)
    _, name, fields = keys.read_key_body(body, creating=False)
    info = await runtime.db.run(keys.update_key, key_id, fields, name)
    if info is None:
        raise key_not_found(key_id)
    await runtime.refresh()
    return JSONResponse(info.to_dict())


async def list_keys(request: Request) -> Response:
    """``GET /v0/keys`` (admin): never the keys themselves."""
    runtime = _guard(request, "admin")
    infos = await runtime.db.run(keys.list_keys)
    return JSONResponse({"keys": [info.to_dict() for info in infos]})


async def delete_key(request: Request) -> Response:
    """``DELETE /v0/keys/{key_id}`` (admin)."""
    runtime = _guard(request, "admin")
    key_id = request.path_params["key_id"]
    if "\x00" in key_id or not await runtime.db.run(keys.delete_key, key_id):
        raise key_not_found(key_id)
    await runtime.refresh()
    return Response(status_code=204)


# -- usage ---------------------------------------------------------------------------------


async def usage_report(request: Request) -> Response:
    """``GET /v0/usage?key=&model=&from=&to=&group_by=&format=`` (admin): requests and
    tokens per group (JSON, or ``format=csv``)."""
    runtime = _guard(request, "admin")
    return await _usage_answer(request, runtime, None)


async def usage_self(request: Request) -> Response:
    """``GET /v0/usage/self`` (any valid key): the presenting key's own usage, and its
    budget when it has one; naming another key in ``key`` is 403."""
    runtime = _runtime(request)
    headers = request.headers
    entry = runtime.keys.lookup(headers.get("authorization"), headers.get("x-api-key"))
    if entry is None:
        raise unauthorized(401)
    asked = request.query_params.get("key")
    if asked is not None and asked != entry.id:
        raise ApiError(403, "insufficient_scope", "a key may read only its own usage", param="key")
    return await _usage_answer(request, runtime, entry)


async def _usage_answer(request: Request, runtime: Runtime, own: KeyEntry | None) -> Response:
    params = request.query_params
    fmt = params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, "invalid_request_error", "format is json or csv", param="format")
    query = usage.parse_query(params, db.unix_now())
    if own is not None:
        query = replace(query, key=own.id)
    with contextlib.suppress(Exception):  # this worker's last second, when it can be written
        await runtime.flush_usage()
    rows = await runtime.db.run(usage.query, query)
    if fmt == "csv":
        return Response(usage.to_csv(rows, query.group_by), media_type="text/csv")
    answer: dict = {
        "from": db.iso_from_unix(query.start),
        "to": db.iso_from_unix(query.end),
        "group_by": list(query.group_by),
        "usage": rows,
    }
    if own is not None:
        answer["key"] = own.id
        limits = own.limits
        if limits is not None and limits.budget_period is not None:
            since = period_start(limits.budget_period, db.unix_now())
            spent = (await runtime.db.run(usage.spent, [own.id], since)).get(own.id, 0)
            answer["budget"] = {
                "budget_tokens": limits.budget_tokens,
                "budget_period": limits.budget_period,
                "spent": spent,
                "remaining": max(0, (limits.budget_tokens or 0) - spent),
            }
    return JSONResponse(answer)


# -- audit ---------------------------------------------------------------------------------

# Handlers whose success is an admin action, and the action's name in the audit log.
AUDITED = {
    "create_key": "key.created",
    "update_key": "key.changed",
    "delete_key": "key.revoked",
    "register_model": "model.registered",
    "delete_model": "model.deleted",
    "retry_model": "model.retried",
    "approve_node": "node.approved",
    "revoke_node": "node.revoked",
    "unregister_node": "node.removed",
}


async def _audit(request: Request, action: str, response: Response) -> None:
    """Append a succeeded admin action to the audit log: the acting key's id, the target
    (the path's id, else the id the answer names) and the request's JSON body."""
    runtime = _runtime(request)
    entry = runtime.keys.entry_of(_bearer(request))
    actor = entry.id if entry is not None else ""
    params = request.path_params
    target = params.get("key_id") or params.get("node_id") or params.get("model_id") or ""
    change = request.scope.get(BODY_SCOPE)  # the body the handler read, if any
    if not target:
        with contextlib.suppress(Exception):
            target = str(orjson.loads(bytes(response.body)).get("id") or "")
    try:
        await runtime.db.run(audit.append, actor, action, unquote(target), change)
    except Exception as exc:  # noqa: BLE001 - the action is done; say so loudly
        logger.error("cannot append %s on %s to the audit log: %s", action, target, exc)


async def audit_log(request: Request) -> Response:
    """``GET /v0/audit?after=&limit=`` (admin): entries oldest first, and ``count``, the
    number of entries the routers wrote (``llmlb audit verify`` checks the chain)."""
    runtime = _guard(request, "admin")
    params = request.query_params
    try:
        after = int(params.get("after") or 0)
        limit = int(params.get("limit") or audit.MAX_PAGE)
    except ValueError:
        raise ApiError(
            400, "invalid_request_error", "after and limit are integers", param="after"
        ) from None
    if not 0 <= after < 2**62 or not 1 <= limit <= audit.MAX_PAGE:
        raise ApiError(
            400, "invalid_request_error", f"limit is 1 to {audit.MAX_PAGE}", param="limit"
        )
    entries, count = await runtime.db.run(audit.read, after, limit)
    return JSONResponse({"entries": entries, "count": count})


# -- models --------------------------------------------------------------------------------


async def register_model(request: Request) -> Response:
    """``POST /v1/models/register`` (admin): hub lookup, then model + manifest in one go."""
    runtime = _guard(request, "admin")
    try:
        req = registry.RegisterRequest.parse(
            await read_json(request, runtime.settings.max_body_bytes)
        )
        if await runtime.db.run(registry.model_exists, req.model_id):
            raise model_already_registered(req.model_id)
        await runtime.db.run(registry.check_no_conflict, req.model_id)
        manifest = await registry.fetch_manifest(runtime.settings, req)
        row = await runtime.db.run(registry.store_model, req.model_id, manifest, req.chat_template)
    except ApiError as exc:
        REGISTRATIONS.labels(result=exc.code).inc()
        raise
    REGISTRATIONS.labels(result="ok").inc()
    logger.info("registered model %s from %s@%s", req.model_id, manifest.repo, manifest.revision)
    await runtime.refresh()
    await runtime.notify(
        [node.node_id for node in runtime.fleet.online_nodes()], [req.model_id], "register"
    )
    entry = runtime.fleet.model_entry(req.model_id) or {}
    return JSONResponse({**entry, **row}, status_code=201)


async def delete_model(request: Request) -> Response:
    """``DELETE /v1/models/{id}`` (admin)."""
    runtime = _guard(request, "admin")
    model_id = _path_model_id(request)
    if not await runtime.db.run(registry.delete_model, model_id):
        raise model_not_found(model_id)
    logger.info("deleted model %s", model_id)
    await runtime.refresh()
    await runtime.notify(
        [node.node_id for node in runtime.fleet.online_nodes()], [model_id], "delete"
    )
    return Response(status_code=204)


async def retry_model(request: Request) -> Response:
    """``POST /v0/models/{id}/retry`` (admin): nodes retry the model's failed download now."""
    runtime = _guard(request, "admin")
    model_id = _path_model_id(request)
    if not await runtime.db.run(registry.model_exists, model_id):
        raise model_not_found(model_id)
    node_ids = [node.node_id for node in runtime.fleet.online_nodes()]
    await runtime.notify(node_ids, [model_id], "retry")
    return JSONResponse({"model": model_id, "action": "retry", "nodes": node_ids}, status_code=202)


async def list_models(request: Request) -> Response:
    """``GET /v1/models`` (api): registered models and those online nodes hold."""
    runtime = _guard(request, "api")
    return JSONResponse({"object": "list", "data": runtime.fleet.model_entries()})


async def get_model(request: Request) -> Response:
    """``GET /v1/models/{id}`` (api)."""
    runtime = _guard(request, "api")
    model_id = _path_model_id(request)
    entry = runtime.fleet.model_entry(model_id)
    if entry is None:
        raise model_not_found(model_id)
    return JSONResponse(entry)


async def node_models(request: Request) -> Response:
    """``GET /v0/models`` (node): what nodes should hold."""
    runtime = _guard(request, "node")
    return JSONResponse({"models": await runtime.db.run(registry.list_models)})


async def manifest(request: Request) -> Response:
    """``GET /v0/models/registry/{id}/manifest.json`` (node), served from the database."""
    runtime = _guard(request, "node")
    model_id = _path_model_id(request)
    found = await runtime.db.run(registry.get_manifest, model_id)
    if found is None:
        raise model_not_found(model_id)
    requester = request.query_params.get("node_id")
    if requester is not None:  # a node asking: who can serve it the files
        requester = validate_node_id(requester)
        view, reports = await runtime.db.run(
            _peer_inputs, model_id, runtime.settings.offline_after_s
        )
        seeds, wait_s = runtime.settings.peer_seeds, runtime.settings.peer_wait_s
        sources, wait = peers.peer_plan(
            model_id,
            found["revision"],
            requester,
            view,
            seeds=seeds,
            wait_s=wait_s,
            bad=peers.weigh_reports(reports, requester),
        )
        found["peers"] = [source.to_dict() for source in sources]
        found["peer_wait_s"] = wait
    return JSONResponse(found)


def _peer_inputs(
    conn: db.Conn, model_id: str, offline_after_s: float
) -> tuple[list[peers.NodeModels], list[tuple[str, str]]]:
    return nodes.peer_view(conn, offline_after_s), nodes.peer_reports(conn, model_id)


async def report_peer(request: Request) -> Response:
    """``POST /v0/peers/report`` (node): a peer served bytes that failed their check. An
    approved reporter's report takes the peer off its own list for the model, and off every
    list once enough approved nodes reported it
    (:func:`llmlb.router.control.peers.weigh_reports`)."""
    runtime = _guard(request, "node")
    report = PeerReport.parse(await read_json(request, runtime.settings.max_body_bytes))
    counted = await runtime.db.run(nodes.record_peer_report, report, _bearer(request))
    peers.log_report(report.model_id, report.node_id, report.reason, report.reporter, counted)
    answer = {
        "model_id": report.model_id,
        "node_id": report.node_id,
        "reason": report.reason,
        "reporter": report.reporter,
        "counted": counted,
    }
    return JSONResponse(answer, status_code=202)


# -- nodes ---------------------------------------------------------------------------------


async def register_node(request: Request) -> Response:
    """``POST /v0/nodes`` (node): register (or re-register) a node.

    The id is bound to the body's ``node_secret`` (else to the bearer key); another
    credential gets 409 ``node_id_conflict`` until an admin removes the node. An id never
    approved joins ``pending`` (no traffic, no peer token) unless the router approves nodes
    automatically (``--node-approval auto``).
    """
    runtime = _guard(request, "node")
    reg = Registration.parse(await read_json(request, runtime.settings.max_body_bytes))
    enrolled = await runtime.db.run(
        partial(nodes.enroll, auto_approve=runtime.settings.auto_approve), reg, _bearer(request)
    )
    if enrolled.approved:
        logger.info("node %s registered at %s", reg.node_id, reg.url)
    else:
        logger.warning(
            "node %s registered at %s and waits for approval (llmlb nodes approve %s)",
            reg.node_id,
            reg.url,
            reg.node_id,
        )
    await runtime.refresh()
    approval, peer_token = _membership(runtime, enrolled.approved)
    answer = RegistrationAnswer(
        reg.node_id, runtime.settings.heartbeat_interval_s, approval, peer_token, enrolled.token
    )
    return JSONResponse(answer.to_dict(), status_code=201)


def _membership(runtime: Runtime, approved: bool) -> tuple[str, str | None]:
    """The approval of a registration or heartbeat answer, and the peer token when
    approved."""
    if not approved:
        return nodes.PENDING, None
    return nodes.APPROVED, peers.fleet_token(runtime.settings.home, runtime.settings.fleet_secret)


async def node_heartbeat(request: Request) -> Response:
    """``POST /v0/nodes/{node_id}/heartbeat`` (node): 404 ``node_not_found`` for an unknown
    id, 409 ``node_id_conflict`` when it is bound to another credential; both mean "register
    again"."""
    runtime = _guard(request, "node")
    node_id = validate_node_id(request.path_params["node_id"])
    beat = Heartbeat.parse(await read_json(request, runtime.settings.max_body_bytes))
    approved = await runtime.db.run(
        partial(nodes.record_heartbeat, auto_approve=runtime.settings.auto_approve),
        node_id,
        beat,
        _bearer(request),
    )
    if approved is None:
        raise _node_not_found(node_id)
    await runtime.refresh()
    interval = runtime.settings.heartbeat_interval_s
    answer = HeartbeatAnswer(node_id, interval, *_membership(runtime, approved))
    return JSONResponse(answer.to_dict())


async def node_cache(request: Request) -> Response:
    """``POST /v0/nodes/{node_id}/cache`` (node): what the node's prompt caches gained and
    lost (:class:`llmlb.prefix_keys.CacheReport`), applied to this worker's prefix index.

    The node must be registered (404 ``node_not_found``), present the credential its id is
    bound to (409 ``node_id_conflict``) and be approved (403 ``node_pending``). A delta this
    router cannot apply (a new epoch, a gap in ``seq``, or nothing known of the node yet)
    gets 409 ``cache_resync``: the node's keys are forgotten until it sends a snapshot.
    Nothing is written to the database.
    """
    runtime = _guard(request, "node")
    node_id = validate_node_id(request.path_params["node_id"])
    try:
        report = _normalized(
            CacheReport.parse(await read_json(request, MAX_REPORT_BYTES))
        )
    except (ApiError, CacheReportError) as exc:
        CACHE_REPORTS.labels(result="invalid").inc()
        if isinstance(exc, ApiError):
            raise
        raise ApiError(400, "invalid_request_error", f"cache report: {exc}") from None
    member = runtime.fleet.member(node_id)
    if member is None:  # registered a moment ago through another worker or router?
        with contextlib.suppress(Exception):
            await runtime.refresh()
        member = runtime.fleet.member(node_id)
    try:
        if member is None:
            raise _node_not_found(node_id)
        bound, approved = member
        if not nodes.Credential(report.node_secret, _bearer(request)).proves(bound):
            raise nodes.id_conflict(node_id)
        if not approved:
            raise ApiError(
                403,
                "node_pending",
                f"node {node_id} waits for approval; its cache reports count once approved",
            )
    except ApiError:
        CACHE_REPORTS.labels(result="refused").inc()
        raise
    if runtime.index.apply(node_id, report) is ReportResult.RESYNC:
        CACHE_REPORTS.labels(result="resync").inc()
        raise ApiError(
            409,
            "cache_resync",
            f"this router cannot apply seq {report.seq} of epoch {report.epoch} to node "
            f"{node_id}'s cache (a new epoch, a gap, or nothing known of it yet): send a snapshot",
        )
    CACHE_REPORTS.labels(result="snapshot" if report.snapshot else "delta").inc()
    answer = {
        "node_id": node_id,
        "epoch": report.epoch,
        "seq": report.seq,
        "keys": runtime.index.keys_held(node_id),
    }
    return JSONResponse(answer, status_code=202)


def _normalized(report: CacheReport) -> CacheReport:
    """``report`` with its model ids normalised as the proxy routes by them.

    Raises:
        ApiError: 400 ``invalid_model_id``.
    """
    parts = []
    changed = False
    for part in (report.stored, report.removed):
        models: dict[str, list[int]] = {}
        for model, held in part.items():
            try:
                name = normalize_model_id(model)
            except ValueError as exc:
                raise ApiError(400, "invalid_model_id", f"cache report: {exc}") from None
            if name != model or name in models:
                changed = True
            models[name] = [*models[name], *held] if name in models else held
        parts.append(models)
    if not changed:
        return report
    return CacheReport(
        report.epoch, report.seq, report.snapshot, parts[0], parts[1], report.node_secret
    )


def _node_not_found(node_id: str) -> ApiError:
    return ApiError(404, "node_not_found", f"node {node_id} is not registered")


async def approve_node(request: Request) -> Response:
    """``POST /v0/nodes/{node_id}/approve`` (admin): the node serves clients, joins the peer
    lists and gets the peer token with its next heartbeat (idempotent)."""
    return await _set_approval(request, nodes.approve, approved=True)


async def revoke_node(request: Request) -> Response:
    """``POST /v0/nodes/{node_id}/revoke`` (admin): the node is pending again: no client
    traffic, out of the peer lists (idempotent)."""
    return await _set_approval(request, nodes.revoke, approved=False)


async def _set_approval(
    request: Request, change: Callable[[db.Conn, str], bool], *, approved: bool
) -> Response:
    runtime = _guard(request, "admin")
    node_id = validate_node_id(request.path_params["node_id"])
    if not await runtime.db.run(change, node_id):
        raise _node_not_found(node_id)
    logger.info("node %s %s by an admin", node_id, "approved" if approved else "revoked")
    await runtime.refresh()
    state = nodes.APPROVED if approved else nodes.PENDING
    return JSONResponse({"node_id": node_id, APPROVAL_FIELD: state})


async def unregister_node(request: Request) -> Response:
    """``DELETE /v0/nodes/{node_id}``: an admin removes any node; a node key only a node bound
    to that key. Pending notifications stop."""
    runtime = _guard(request, "node")
    node_id = validate_node_id(request.path_params["node_id"])
    key = _bearer(request)
    forced = key is not None and runtime.keys.scope_of(key) == "admin"
    if not await runtime.db.run(partial(nodes.unregister, force=forced), node_id, key):
        raise _node_not_found(node_id)
    runtime.forget_node(node_id)
    logger.info("node %s unregistered", node_id)
    await runtime.refresh()
    return Response(status_code=204)


async def list_nodes(request: Request) -> Response:
    """``GET /v0/nodes`` (admin): nodes with their state, approval and models."""
    runtime = _guard(request, "admin")
    found = await runtime.db.run(nodes.list_nodes, runtime.settings.offline_after_s)
    return JSONResponse({"nodes": found})


async def traffic(request: Request) -> Response:
    """``GET /v0/traffic`` (admin): the last minutes of proxied traffic, for the dashboard."""
    _guard(request, "admin")
    return JSONResponse(request.app.state.traffic.to_dict())


def _by_method(**handlers: Endpoint) -> tuple[Endpoint, list[str]]:
    """One endpoint serving several methods, so a wrong method gets 405 with a full ``Allow``."""

    async def dispatch(request: Request) -> Response:
        method = request.method.lower()
        handler = handlers["get"] if method == "head" else handlers[method]
        request.scope["llmlb.handler"] = handler.__name__
        response = await handler(request)
        if handler.__name__ in AUDITED and 200 <= response.status_code < 300:
            await _audit(request, AUDITED[handler.__name__], response)
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
