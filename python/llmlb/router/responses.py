"""The router's HTTP helpers: JSON responses, errors, auth (request bodies: ``llmlb.http``)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from llmlb.errors import ApiError, error_body
from llmlb.http import read_json, too_large
from llmlb.router.keys import FORBIDDEN, KeyCache

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

_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


class JSONResponse(Response):
    """A JSON response serialised with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: ApiError) -> Response:
    """The OpenAI-shaped response of an :class:`ApiError`."""
    return Response(exc.body(), exc.status, exc.headers(), media_type="application/json")


def unauthorized(status: int) -> ApiError:
    """401 ``invalid_api_key`` or 403 ``insufficient_scope``."""
    if status == FORBIDDEN:
        return ApiError(403, "insufficient_scope", "this key's scope does not allow this route")
    return ApiError(401, "invalid_api_key", "missing or invalid API key (Authorization: Bearer)")


def authorize(request: Request, keys: KeyCache, scope: str | None) -> None:
    """Check the request's bearer key against ``scope`` (``None``: any valid key).

    Raises:
        ApiError: 401 or 403.
    """
    denied = keys.check(request.headers.get("authorization"), scope)
    if denied is not None:
        raise unauthorized(denied)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette handler for :class:`ApiError`."""
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette handler turning its own 404/405/… into the OpenAI error shape."""
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "invalid_request_error")
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    headers = dict(exc.headers or {})
    return Response(
        error_body(message, code, exc.status_code),
        exc.status_code,
        headers,
        media_type="application/json",
    )


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """Unhandled exceptions: 500 in the OpenAI error shape."""
    return Response(
        error_body("internal server error", "internal_error", 500),
        500,
        media_type="application/json",
    )
