"""A fast mock OpenAI backend (raw ASGI, served by Granian) for the router benchmark and tests.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` answer a fixed
~300-byte completion, or, with ``"stream": true``, a 20-event SSE stream ending in
``data: [DONE]``. ``GET /health`` answers 200.

Tests make one process look like many nodes with different behaviour through a path prefix
``/_mock/<tag>/<mode>/`` before the usual route (register a node with URL
``http://host:port/_mock/<tag>/<mode>``). Modes: ``ok``; ``fail500`` (500 JSON error);
``sleep<ms>`` (wait before answering); ``drip<ms>`` (stream 5 events ``ms`` apart; a
non-streaming request gets the fixed completion at once);
``break`` (stream 3 events, then drop the connection; non-streaming: drop before
answering); ``echo`` (answer the request's body and headers); ``down`` (``/health`` answers
503, requests 500); ``strict`` (a 500 ``text/plain`` to a body whose ``temperature``,
``stop`` or ``seed`` has the wrong type, like a node without parameter validation; else
``ok``). Every answer carries ``x-mock-node: <tag>``; ``GET /_stats`` returns
``{tag: requests}`` and ``POST /_stats/reset`` clears it.

Run: ``python bench/router/mock_backend.py --host 127.0.0.1 --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import orjson

_COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-mock0000000000000000000000",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The quick brown fox jumps over it."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }
)
_EMBEDDING = orjson.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
        "model": "mock",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
)
_STREAM_EVENTS = 20


def _event(index: int) -> bytes:
    delta = {"content": f"tok{index} "} if index < _STREAM_EVENTS - 1 else {}
    finish = None if index < _STREAM_EVENTS - 1 else "stop"
    chunk = {
        "id": "chatcmpl-mock0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "mock",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


_EVENTS = [_event(i) for i in range(_STREAM_EVENTS)]
# The final chunk of ``stream_options.include_usage``: no choices, the usage.
_USAGE_EVENT = b"data: " + orjson.dumps(
    {
        "id": "chatcmpl-mock0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "mock",
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 19, "total_tokens": 31},
    }
) + b"\n\n"
_DONE = b"data: [DONE]\n\n"
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream")
_HEADERS = {
    len(body): [_JSON, (b"content-length", str(len(body)).encode())]
    for body in (_COMPLETION, _EMBEDDING)
}
_STATS: dict[str, int] = {}


async def _read_body(receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    return body


async def _json(send, status: int, body: bytes, extra: list | None = None) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(
    send, extra: list, events: list[bytes], then_break: bool = False, gap: float = 0.0
) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [_SSE, *extra]})
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
        if gap:
            await asyncio.sleep(gap)
    if then_break:
        raise ConnectionAbortedError("mock: dropping the stream")
    await send({"type": "http.response.body", "body": _DONE, "more_body": False})


def _invalid_params(body: bytes) -> bool:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    temperature, stop, seed = doc.get("temperature", 1.0), doc.get("stop"), doc.get("seed", 0)
    return (
        not isinstance(temperature, int | float)
        or not isinstance(stop, str | list | None)
        or not isinstance(seed, int)
    )


async def app(scope, receive, send) -> None:
    """The mock backend (raw ASGI)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path: str = scope["path"]
    tag, mode, extra = "", "ok", []
    if path.startswith("/_mock/"):
        _, _, tag, mode, *rest = path.split("/", 4)
        path = "/" + (rest[0] if rest else "")
        extra = [(b"x-mock-node", tag.encode())]
    if path == "/health":
        await _json(send, 503 if mode == "down" else 200, b'{"status":"ok"}', extra)
        return
    if path.startswith("/_stats"):
        await _read_body(receive)
        if path == "/_stats/reset":
            _STATS.clear()
        await _json(send, 200, orjson.dumps(_STATS))
        return
    body = await _read_body(receive)
    if tag:
        _STATS[tag] = _STATS.get(tag, 0) + 1
    streaming = b'"stream":true' in body or b'"stream": true' in body
    if mode.startswith("drip") and streaming:
        await _stream(send, extra, _EVENTS[:5], gap=int(mode[4:]) / 1000)
        return
    if mode.startswith("sleep"):
        await asyncio.sleep(int(mode[5:]) / 1000)
    elif mode in ("fail500", "down"):
        await _json(
            send,
            500,
            b'{"error":{"message":"mock failure","type":"server_error","code":"mock_failure"}}',
            extra,
        )
        return
    elif mode == "strict" and _invalid_params(body):
        headers = [(b"content-type", b"text/plain"), *extra]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": b"Internal Server Error"})
        return
    elif mode == "echo":
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        echo = {"body": body.decode(), "headers": headers, "path": path}
        await _json(send, 200, orjson.dumps(echo), extra)
        return
    if mode == "break":
        if not streaming:
            raise ConnectionAbortedError("mock: dropping the request")
        await _stream(send, extra, _EVENTS[:3], then_break=True)
        return
    if streaming:
        usage = b'"include_usage":true' in body
        await _stream(send, extra, [*_EVENTS, _USAGE_EVENT] if usage else _EVENTS)
        return
    payload = _EMBEDDING if path.endswith("/embeddings") else _COMPLETION
    if extra:
        await _json(send, 200, payload, extra)
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS[len(payload)]})
    await send({"type": "http.response.body", "body": payload})


def main(argv: list[str] | None = None) -> int:
    """Serve the mock with Granian (1 worker)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.chdir(here)
    argv = [
        sys.executable, "-m", "granian", "--interface", "asgi", "--host", args.host,
        "--port", str(args.port), "--workers", str(args.workers), "--no-ws",
        "--backlog", "4096", "--backpressure", "16384",  # thousands of streams at once
        "--log-level", "warning", "mock_backend:app",
    ]  # fmt: skip
    os.execv(sys.executable, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
