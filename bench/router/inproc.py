"""The proxy's own cost per request, in-process: ``InferenceProxy`` driven over ASGI by fake
``receive``/``send`` callables (no Granian, no HTTP client), forwarding to the real mock
backend (``mock_backend.py``) on loopback, on uvloop like the router.

    python bench/router/inproc.py [--src DIR] [--requests 20000] [--concurrency 32]
        [--routing prefix|p2c] [--stream]

The request is the one ``run.py`` sends (a one-message chat body, ``Content-Length``, a key
without limits in the scope, usage accounted as the router's app does), and ``receive``
answers like Granian's: the body with ``more_body`` set, then an empty last message. Prints
the process CPU time per request over a warm run of ``--requests``. For counts that other
work on the machine does not move, run it under callgrind twice with different
``--requests`` and divide the difference of the totals by the difference of the counts::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/a python bench/router/inproc.py \\
        --requests 2000
    valgrind --tool=callgrind --callgrind-out-file=/tmp/b python bench/router/inproc.py \\
        --requests 4000

``--src DIR`` runs another source tree's ``llmlb`` (a directory holding the package), for A/B
comparisons of two versions of the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "mock/model"
PROMPT = {"role": "user", "content": "Say hello in one short sentence."}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mock() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "mock_backend.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the mock backend did not start") from None
            time.sleep(0.1)


async def _drive(url: str, requests: int, concurrency: int, routing: str, stream: bool) -> dict:
    from llmlb.router.control.fleet import FleetView, ModelReport, NodeView, RegisteredModel
    from llmlb.router.control.fleet import NodeState as FleetNode
    from llmlb.router.control.keys import KeyEntry
    from llmlb.router.proxy.proxy import KEY_SCOPE, InferenceProxy, ProxySettings

    fleet = FleetView()
    node = FleetNode(NodeView("mock-node", url, 4096), True, {MODEL: ModelReport("ready")})
    fleet.load([node], [RegisteredModel(MODEL, MODEL, "gguf", 1, 0)])
    book: dict = {}

    def on_usage(key, model, node, prompt, cached, completion, error) -> None:  # noqa: ANN001
        row = book.setdefault((key, model, node), [0, 0, 0, 0, 0])
        row[0] += 1
        row[1] += prompt
        row[3] += completion

    proxy = InferenceProxy(fleet, ProxySettings(routing=routing), on_usage=on_usage)
    await proxy.start()
    payload = {"model": MODEL, "messages": [PROMPT], "max_tokens": 16}
    if stream:
        payload["stream"] = True
    body = json.dumps(payload).encode()
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer sk-bench"),
        (b"content-length", str(len(body)).encode()),
    ]
    entry = KeyEntry("key-bench", "api")
    first = {"type": "http.request", "body": body, "more_body": True}
    last = {"type": "http.request", "body": b"", "more_body": False}
    statuses: dict[int, int] = {}
    sends = 0

    async def one() -> None:
        given = 0

        async def receive() -> dict:
            nonlocal given
            given += 1
            if given == 1:
                return first
            if given == 2:
                return last
            await asyncio.Event().wait()  # never disconnects
            return {}

        async def send(message: dict) -> None:
            nonlocal sends
            sends += 1
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": headers,
            KEY_SCOPE: entry,
        }
        await proxy(scope, receive, send)

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    async def batch(total: int) -> None:
        share, extra = divmod(total, concurrency)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))

    await batch(min(requests, 1000))  # warm-up: connections, caches
    statuses.clear()
    sends = 0
    cpu, wall = time.process_time(), time.perf_counter()
    await batch(requests)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await proxy.close()
    return {
        "requests": requests,
        "statuses": statuses,
        "cpu_us_per_request": cpu * 1e6 / requests,
        "requests_per_s": requests / wall,
        "sends_per_request": sends / requests,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="directory holding the llmlb package to run")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--routing", default="prefix", choices=("prefix", "p2c"))
    parser.add_argument("--stream", action="store_true", help="streamed answers")
    args = parser.parse_args()
    if args.src:
        sys.meta_path[:] = [f for f in sys.meta_path if "_editable" not in type(f).__module__]
        sys.path.insert(0, args.src)
    import uvloop

    proc, url = _start_mock()
    try:
        result = uvloop.run(_drive(url, args.requests, args.concurrency, args.routing, args.stream))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
