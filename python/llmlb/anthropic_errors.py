"""Anthropic's error shape, for the Messages API routes of the node and the router.

Anthropic's clients expect ``{"type": "error", "error": {"type", "message"}}`` with an
error type that follows the HTTP status; llmlb's errors are OpenAI-shaped
(:mod:`llmlb.errors`). One mapping, used by the node's ``/v1/messages`` handlers and by the
router for the errors it produces itself on ``/v1/messages*``.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmlb.errors import ApiError, ContextLengthExceeded

# The routes that answer in Anthropic's dialect.
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's ``error.type`` for an HTTP status."""
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_object(status: int, message: str) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_body(status: int, message: str) -> bytes:
    """The JSON bytes of :func:`error_object`."""
    return orjson.dumps(error_object(status, message))


def from_api_error(exc: ApiError) -> bytes:
    """An :class:`ApiError` in Anthropic's shape (a context overflow in Anthropic's words)."""
    if isinstance(exc, ContextLengthExceeded):
        return error_body(exc.status, exc.anthropic_message())
    return error_body(exc.status, exc.message)


def from_openai_body(body: bytes, status: int) -> bytes:
    """Re-shape an OpenAI-shaped error body; a body already in Anthropic's shape (or not an
    error body at all) is returned unchanged."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(doc, dict) or doc.get("type") == "error":
        return body
    error = doc.get("error")
    if not isinstance(error, dict):
        return body
    return error_body(status, str(error.get("message") or "error"))


def sse_error(status: int, message: str) -> bytes:
    """An ``event: error`` server-sent event ending an Anthropic stream."""
    return b"event: error\ndata: " + error_body(status, message) + b"\n\n"
