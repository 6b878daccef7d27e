"""Routes of the API keys, their usage and the audit log of admin actions (admin, and
``/v0/usage/self`` for any key); :data:`AUDITED` names the actions the log records.

Apart from the other areas: keys and usage are the tenancy's control surface.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from urllib.parse import unquote

import orjson
from starlette.requests import Request
from starlette.responses import Response

from llmlb.errors import ApiError, key_not_found
from llmlb.http import JSONResponse
from llmlb.router import db
from llmlb.router.api.responses import (  # control bodies: no NUL
    BODY_SCOPE,
    read_json,
    unauthorized,
)
from llmlb.router.api.routes.common import _bearer, _guard, _runtime
from llmlb.router.control import audit, keys, usage
from llmlb.router.control.keys import KeyEntry
from llmlb.router.control.limits import parse_limits
from llmlb.router.proxy.key_state import period_start
from llmlb.router.runtime import Runtime

logger = logging.getLogger("llmlb.router")


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


def audit_actor(request: Request) -> str:
    """The id of the key presenting ``request`` (``""`` when none is valid). Read before the
    action runs: a key that revokes or expires itself is still the actor of that change."""
    entry = _runtime(request).keys.entry_of(_bearer(request))
    return entry.id if entry is not None else ""


async def _audit(request: Request, action: str, actor: str, response: Response) -> None:
    """Append a succeeded admin action to the audit log: the acting key's id (from
    :func:`audit_actor`), the target (the path's id, else the id the answer names) and the
    request's JSON body (secret fields redacted: :func:`llmlb.router.control.audit.scrub`)."""
    runtime = _runtime(request)
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
