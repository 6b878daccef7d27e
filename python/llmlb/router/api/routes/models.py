"""Routes of the registered models (register, delete, retry, list), the nodes' model list
and manifests (with the peers a node may fetch from), and peer reports.

Apart from :mod:`.nodes`: a model's life in the registry, not a node's membership.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response

from llmlb.errors import ApiError, model_already_registered, model_not_found
from llmlb.http import JSONResponse
from llmlb.protocol import PeerReport, validate_node_id
from llmlb.router import db
from llmlb.router.api.responses import read_json  # control bodies: no NUL
from llmlb.router.api.routes.common import _bearer, _guard, _path_model_id
from llmlb.router.control import nodes, peers, registry

logger = logging.getLogger("llmlb.router")

REGISTRATIONS = Counter(
    "llmlb_router_model_registrations_total", "Model registrations by result code.", ["result"]
)


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
