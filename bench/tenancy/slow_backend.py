"""A slow mock backend that counts the requests it holds at once (the ``parallel`` phase of
``bench/tenancy/run.py``).

``POST /v1/chat/completions`` answers the mock backend's fixed completion
(``bench/router/mock_backend.py``, usage 12 + 9 tokens) after ``--delay-ms``; ``GET
/health`` answers 200; ``GET /_inflight`` returns ``{"now", "max", "requests"}`` (requests
being answered now, the most at once, and how many came) and ``POST /_inflight/reset``
clears them.

Run: ``python bench/tenancy/slow_backend.py --port 9100 --delay-ms 200``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))

from mock_backend import _COMPLETION  # noqa: E402 - after the path is set


def make_app(delay_s: float) -> web.Application:
    """The backend's routes, answering after ``delay_s``."""
    counts = {"now": 0, "max": 0, "requests": 0}

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        counts["now"] += 1
        counts["requests"] += 1
        counts["max"] = max(counts["max"], counts["now"])
        try:
            await asyncio.sleep(delay_s)
        finally:
            counts["now"] -= 1
        return web.Response(body=_COMPLETION, content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def inflight(_: web.Request) -> web.Response:
        return web.Response(body=json.dumps(counts), content_type="application/json")

    async def reset(_: web.Request) -> web.Response:
        counts.update(max=counts["now"], requests=0)
        return web.json_response(counts)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/_inflight", inflight)
    app.router.add_post("/_inflight/reset", reset)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    args = parser.parse_args()
    web.run_app(
        make_app(args.delay_ms / 1000), host=args.host, port=args.port, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
