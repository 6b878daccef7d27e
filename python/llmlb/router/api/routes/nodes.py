"""Routes of the nodes: registration, heartbeats, cache reports, approval, removal, the
node list and the traffic view.

Apart from :mod:`.models`: a node's membership and reports, not the registry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response

from llmlb.errors import ApiError
from llmlb.http import JSONResponse
from llmlb.model_storage import normalize_model_id
from llmlb.prefix_keys import CacheReport, CacheReportError
from llmlb.protocol import (
    APPROVAL_FIELD,
    Heartbeat,
    HeartbeatAnswer,
    Registration,
    RegistrationAnswer,
    validate_node_id,
)
from llmlb.router import db
from llmlb.router.api.responses import read_json  # control bodies: no NUL
from llmlb.router.api.routes.common import _bearer, _guard
from llmlb.router.control import nodes, peers
from llmlb.router.proxy.prefix_index import MAX_REPORT_BYTES, ReportResult
from llmlb.router.runtime import Runtime

logger = logging.getLogger("llmlb.router")

CACHE_REPORTS = Counter(
    "llmlb_router_cache_reports_total",
    "Nodes' cache reports by result (snapshot, delta, resync, invalid, refused).",
    ["result"],
)


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
    Nothing is written to the database. With several workers, the report reaches the others
    through :mod:`llmlb.router.proxy.index_bus`.
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
    bus = runtime.index_bus
    if bus is not None:
        bus.drain()  # the reports other workers applied come first
        if not report.snapshot and bus.take_resync(node_id):
            runtime.index.forget(node_id)
    if runtime.index.apply(node_id, report) is ReportResult.RESYNC:
        CACHE_REPORTS.labels(result="resync").inc()
        raise ApiError(
            409,
            "cache_resync",
            f"this router cannot apply seq {report.seq} of epoch {report.epoch} to node "
            f"{node_id}'s cache (a new epoch, a gap, or nothing known of it yet): send a snapshot",
        )
    if bus is not None:
        bus.applied(node_id, report)
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
