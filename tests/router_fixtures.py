"""Starting a real router (``llmlb router``) and talking to it, for any test that needs one."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from tests.procs import LLMLB, Proc, free_port, wait_until


class RouterUrl(str):
    """The router's base URL (a ``str``), carrying its process and home."""

    proc: Proc
    home: Path


def start_router(
    spawn: Callable[..., Proc],
    home: Path,
    admin_key: str,
    *extra_args: str,
    env: dict[str, str] | None = None,
) -> RouterUrl:
    """Start ``llmlb router`` on a free loopback port; return its base URL once ``/health`` is up.

    Nodes are approved as they register (``LLMLB_NODE_APPROVAL=auto``), so tests that only
    need traffic to flow need no admin step; pass ``"--node-approval", "manual"`` (or that
    env) to test enrollment.

    Args:
        spawn: the ``spawn`` fixture (the process is stopped when the test ends).
        home: ``$LLMLB_HOME`` (holds ``lb.db``).
        admin_key: ``LLMLB_ADMIN_KEY``.
        extra_args: more flags, e.g. ``"--workers", "2"``.
        env: more environment, e.g. ``{"HF_ENDPOINT": hub_url}``.
    """
    port = free_port()
    argv = [*LLMLB, "router", "--host", "127.0.0.1", "--port", str(port), *extra_args]
    full_env = {
        "LLMLB_HOME": str(home),
        "LLMLB_ADMIN_KEY": admin_key,
        "LLMLB_NODE_APPROVAL": "auto",
        **(env or {}),
    }
    proc = spawn(argv, env=full_env, name="router")
    url = RouterUrl(f"http://127.0.0.1:{port}")
    proc.wait_http(f"{url}/health", timeout=60)
    if "--workers" in extra_args:  # every worker up, not just the first to answer
        workers = int(extra_args[extra_args.index("--workers") + 1])
        wait_until(
            lambda: f"Started worker-{workers}" in proc.log(),
            timeout=60,
            message=f"{workers} router workers",
        )
    url.proc = proc
    url.home = home
    return url


@dataclass
class Reply:
    """One HTTP answer: status, decoded JSON body (``None`` if empty/not JSON), raw bytes."""

    status: int
    json: Any
    body: bytes
    headers: dict[str, str]


def call(
    base_url: str,
    method: str,
    path: str,
    key: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """Send one request to the router and return its :class:`Reply` (never raises on 4xx/5xx).

    Args:
        key: bearer key, if any.
        body: a JSON-serialisable body, or ``raw`` bytes sent as they are.
    """
    all_headers = dict(headers or {})
    if key:
        all_headers["Authorization"] = f"Bearer {key}"
    data = raw
    if body is not None:
        data = orjson.dumps(body)
        all_headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(base_url + path, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload, reply_headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, payload, reply_headers = exc.code, exc.read(), exc.headers
    try:
        decoded = orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        decoded = None
    return Reply(status, decoded, payload, {k.lower(): v for k, v in reply_headers.items()})


@dataclass
class Arrival:
    """One request a :class:`NodeStandin` received."""

    at: float  # time.monotonic()
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class NodeStandin:
    """A loopback HTTP server standing in for a node's ``/api/models/sync``.

    It answers ``fail_status`` to the first ``failures`` requests, then 200; every request is
    recorded in ``arrivals``. Use as a context manager.
    """

    failures: int = 0
    fail_status: int = 500
    arrivals: list[Arrival] = field(default_factory=list)

    def __post_init__(self) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with standin._lock:
                    failing = len(standin.arrivals) < standin.failures
                    status = standin.fail_status if failing else 200
                    standin.arrivals.append(
                        Arrival(
                            time.monotonic(),
                            "POST",
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            status,
                        )
                    )
                payload = b'{"ok": true}' if status == 200 else b'{"error": "standin"}'
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> NodeStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def free_url() -> str:
    """A loopback URL where nothing listens (a moment ago)."""
    return f"http://127.0.0.1:{free_port()}"
