"""HTTP helpers shared by the router and the node: JSON bodies with a size and a nesting
limit, JSON and error responses, Starlette's error handlers in the OpenAI error shape, model
ids from requests, API keys (bearer or ``x-api-key``)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from llmlb.errors import ApiError, error_body, invalid_model_id, request_too_large
from llmlb.model_storage import InvalidModelId, normalize_model_id

__all__ = [
    "MAX_JSON_DEPTH",
    "JSONResponse",
    "api_error_handler",
    "api_key",
    "bearer_token",
    "check_depth",
    "error_response",
    "has_nul",
    "http_error_handler",
    "json_too_deep",
    "model_id_or_400",
    "read_json",
    "server_error_handler",
    "too_large",
]

_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}

MAX_JSON_DEPTH = 64
"""Deepest nesting of JSON objects and arrays any route of router or node takes (the body's
own object is level 1); deeper bodies get 400 ``invalid_request_error``. OpenAI's and
Anthropic's APIs refuse absurd depths too; a chat body needs about 10 levels, a tool's JSON
schema 2 per level of its own nesting."""
_CONTAINERS = (dict, list)


class JSONResponse(Response):
    """A JSON response serialised with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: ApiError) -> Response:
    """The OpenAI-shaped response of an :class:`ApiError` (with its ``Retry-After``)."""
    return Response(exc.body(), exc.status, exc.headers(), media_type="application/json")


def json_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``value`` (decoded JSON) nests objects and arrays more than ``limit`` deep.

    Walks containers only and stops at ``limit`` levels, so it costs about a microsecond for
    a 4 KB chat body and never recurses further than ``limit``.
    """
    if limit <= 0:
        return type(value) in _CONTAINERS
    items = value.values() if type(value) is dict else value if type(value) is list else ()
    for child in items:  # noqa: SIM110 - a plain loop: any() over a generator costs more
        if type(child) in _CONTAINERS and json_too_deep(child, limit - 1):
            return True
    return False


def check_depth(value: Any, param: str | None = None, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse ``value`` (decoded JSON: a body, or a JSON string's content) nested deeper than
    ``limit``.

    Raises:
        ApiError: 400 ``invalid_request_error`` naming ``param`` when given.
    """
    if json_too_deep(value, limit):
        where = f"'{param}'" if param else "the request body"
        raise ApiError(
            400,
            "invalid_request_error",
            f"{where} nests JSON objects and arrays more than {limit} levels deep",
            param=param,
        )


def has_nul(value: Any) -> bool:
    """True when a string anywhere in ``value`` (decoded JSON, keys included) holds a NUL."""
    if type(value) is str:
        return "\x00" in value
    if type(value) is dict:
        return any("\x00" in key or has_nul(item) for key, item in value.items())
    if type(value) is list:
        return any(has_nul(item) for item in value)
    return False


async def read_json(request: Request, limit: int, *, allow_nul: bool = True) -> dict:
    """The request body as a JSON object, at most ``limit`` bytes and
    :data:`MAX_JSON_DEPTH` levels deep.

    Args:
        request: the request.
        limit: largest body in bytes.
        allow_nul: ``False`` refuses a NUL character in any string (control-plane routes:
            PostgreSQL cannot store one, and no name, URL or template needs one).

    Raises:
        ApiError: 413 ``request_too_large``; 400 ``invalid_request_error`` for malformed JSON,
            a body that is not an object, nesting beyond :data:`MAX_JSON_DEPTH` or a refused
            NUL.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request_error", f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request_error", "the request body must be a JSON object")
    check_depth(data)
    # A NUL reaches a string only as the escape \u0000 (orjson refuses a raw one).
    if not allow_nul and b"\\u0000" in body and has_nul(data):
        raise ApiError(400, "invalid_request_error", "strings must not contain NUL characters")
    return data


def too_large(limit: int) -> ApiError:
    """413 for a body over ``limit`` bytes."""
    return request_too_large(limit)


def model_id_or_400(raw: str, param: str | None = None) -> str:
    """Normalise a model id from a request, or raise 400 ``invalid_model_id``.

    Args:
        raw: the id as the request gave it.
        param: the request field it came from, carried into the error body.
    """
    try:
        return normalize_model_id(raw)
    except InvalidModelId as exc:
        raise invalid_model_id(exc, param) from None


def bearer_token(authorization: bytes | str | None) -> bytes | None:
    """The credential of an ``Authorization: Bearer <token>`` header value, as raw bytes.

    Any bytes are accepted (a ``str`` is taken as the latin-1 text ASGI servers decode headers
    to), so a non-ASCII header is just an unknown credential, never an error.

    Returns:
        The token, or ``None`` when the header is absent, not ``Bearer`` or empty.
    """
    if not authorization:
        return None
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def api_key(
    authorization: bytes | str | None, x_api_key: bytes | str | None = None
) -> bytes | None:
    """The API key a request presents: ``Authorization: Bearer <key>``, else ``x-api-key``
    (what Anthropic's clients send), as raw bytes.

    Returns:
        The key, or ``None`` when neither header carries one.
    """
    token = bearer_token(authorization)
    if token is not None or not x_api_key:
        return token
    if isinstance(x_api_key, str):
        x_api_key = x_api_key.encode("latin-1", "replace")
    return x_api_key.strip() or None


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
