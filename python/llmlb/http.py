"""HTTP helpers shared by the router and the node: JSON bodies with a size limit, bearer keys."""

from __future__ import annotations

import orjson
from starlette.requests import Request

from llmlb.errors import ApiError


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object, at most ``limit`` bytes.

    Raises:
        ApiError: 413 ``request_too_large``; 400 ``invalid_request_error`` for malformed JSON
            or a body that is not an object.
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
    return data


def too_large(limit: int) -> ApiError:
    """413 for a body over ``limit`` bytes."""
    return ApiError(413, "request_too_large", f"request body exceeds {limit} bytes")


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
