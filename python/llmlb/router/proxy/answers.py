"""The answers the router itself gives on the inference routes: error bodies and their
headers (OpenAI's or Anthropic's shape), the SSE error event that ends a cut stream, and the
refusals (queue full, poison, no capable node).

Apart from :mod:`.proxy` so that error shaping is in one place, away from the forwarding.
"""

from __future__ import annotations

import math

from llmlb import anthropic_errors
from llmlb.asgi import Send
from llmlb.errors import ApiError, error_body
from llmlb.router.proxy.exchange import _Failure

_JSON_HEADER = (b"content-type", b"application/json")
_NOT_READY_RETRY_AFTER_S = 5.0


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "error status"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_headers(body: bytes, retry_after: float | None = None) -> list[tuple[bytes, bytes]]:
    headers = [_JSON_HEADER, (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    return headers


def _error_failure(status: int, code: str, message: str, kind: str, held: bool = False) -> _Failure:
    body = error_body(message, code, status)
    return _Failure(status, body, _error_headers(body), kind, held)


def _poison_message(ttl_s: float) -> str:
    return (
        "two nodes failed this request (connection lost or no answer in time), so it is not "
        f"sent to another node; the same request is refused for {ttl_s:g} s"
    )


def _poison_failure(ttl_s: float) -> _Failure:
    return _error_failure(502, "poison_request", _poison_message(ttl_s), "poison")


def _poison_error(ttl_s: float) -> ApiError:
    return ApiError(502, "poison_request", _poison_message(ttl_s))


async def _send_error(
    send: Send,
    exc: ApiError,
    anthropic: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = anthropic_errors.from_api_error(exc) if anthropic else exc.body()
    headers = _error_headers(body, exc.retry_after)
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _sse_error(
    message: str, code: str = "upstream_error", status: int = 502, anthropic: bool = False
) -> bytes:
    if anthropic:
        return anthropic_errors.sse_error(status, message)
    return b"data: " + error_body(message, code, status) + b"\n\n"


def _queue_full(model: str, retry_after: float) -> ApiError:
    message = f"every node serving '{model}' is at capacity; retry later"
    return ApiError(429, "too_many_requests", message, retry_after=retry_after)


def _no_capable_node(model: str, fmt: str | None, runtimes: list[str]) -> ApiError:
    seen = ", ".join(runtimes) or "none reported"
    message = (
        f"no node can serve '{model}': its format is {fmt or 'unknown'}, and the runtimes "
        f"of the nodes that hold it ({seen}) cannot serve that format"
    )
    return ApiError(503, "no_capable_node", message, retry_after=_NOT_READY_RETRY_AFTER_S)
