"""The router's auth helpers and its control-plane JSON bodies; JSON responses and errors
come from ``llmlb.http`` (re-exported here for the router's modules)."""

from __future__ import annotations

from starlette.requests import Request

from llmlb import http
from llmlb.errors import ApiError, invalid_api_key
from llmlb.http import (
    JSONResponse,
    api_error_handler,
    error_response,
    http_error_handler,
    server_error_handler,
    too_large,
)
from llmlb.router.control.keys import FORBIDDEN, KeyCache

__all__ = [
    "JSONResponse",
    "api_error_handler",
    "authorize",
    "error_response",
    "http_error_handler",
    "read_json",
    "server_error_handler",
    "too_large",
    "unauthorized",
]


# Where read_json leaves the parsed body in the request's scope.
BODY_SCOPE = "llmlb.body"


async def read_json(request: Request, limit: int) -> dict:
    """The JSON object body of a control-plane route (keys, models, nodes, peers): at most
    ``limit`` bytes and :data:`llmlb.http.MAX_JSON_DEPTH` levels, and no NUL character in any
    string (PostgreSQL cannot store one; both backends answer the same 400).

    Raises:
        ApiError: 413 or 400, see :func:`llmlb.http.read_json`.
    """
    body = await http.read_json(request, limit, allow_nul=False)
    request.scope[BODY_SCOPE] = body  # what the audit log records of an admin action
    return body


def unauthorized(status: int) -> ApiError:
    """401 ``invalid_api_key`` or 403 ``insufficient_scope``."""
    if status == FORBIDDEN:
        return ApiError(403, "insufficient_scope", "this key's scope does not allow this route")
    return invalid_api_key("API key (Authorization: Bearer or x-api-key)")


def authorize(request: Request, keys: KeyCache, scope: str | None) -> None:
    """Check the request's key (bearer or ``x-api-key``) against ``scope`` (``None``: any
    valid key).

    Raises:
        ApiError: 401 or 403.
    """
    headers = request.headers
    denied = keys.check(headers.get("authorization"), scope, headers.get("x-api-key"))
    if denied is not None:
        raise unauthorized(denied)
