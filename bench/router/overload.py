"""Overload test of one router worker: many long streams at once, the excess shed with 503.

Opens ``--streams`` SSE streams (default 3,000) over ``--ramp`` seconds against a router with
one worker whose only node is the mock backend streaming each answer for ~15 s
(``drip3000``: 5 events 3 s apart), while ``GET /health`` is timed on a fresh connection
every 20 ms. Reports: streams completed (ending in ``data: [DONE]``), shed (503
``overloaded`` with ``Retry-After``), cut (a 200 that did not end in ``[DONE]``), any other
answer; ``/health`` p50/p99/max; whether the mock node stayed online; router CPU and the
machine's load average.

    python bench/router/overload.py [--streams 3000] [--ramp 10] [--max-inflight N] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ADMIN_KEY, MODEL, Fleet, http, tree_cpu_s  # noqa: E402


async def one_stream(host: str, port: int, key: str, outcome: Counter) -> None:
    body = json.dumps(
        {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        outcome["connect_error"] += 1
        return
    try:
        writer.write(head + body)
        data = await asyncio.wait_for(reader.read(), 120)
    except (OSError, TimeoutError):
        outcome["socket_error"] += 1
        return
    finally:
        writer.close()
    status = data[9:12]
    lower = data.lower()
    if status == b"200":
        outcome["completed" if b"data: [DONE]" in data else "cut"] += 1
    elif status == b"503" and b'"overloaded"' in data and b"retry-after:" in lower:
        outcome["shed"] += 1
    else:
        outcome[f"status_{status.decode(errors='replace') or 'none'}"] += 1


async def health_probe(host: str, port: int, stop: asyncio.Event, times: list[float]) -> int:
    failures = 0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            if data[9:12] != b"200":
                failures += 1
        except (OSError, TimeoutError):
            failures += 1
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)
    return failures


async def load(url: str, key: str, streams: int, ramp: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    outcome: Counter = Counter()
    stop = asyncio.Event()
    times: list[float] = []
    probe = asyncio.create_task(health_probe(host, int(port), stop, times))
    tasks = []
    started = time.monotonic()
    for i in range(streams):
        delay = started + ramp * i / streams - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_stream(host, int(port), key, outcome)))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    stop.set()
    health_failures = await probe
    times.sort()
    return {
        "streams": streams,
        "ramp_s": ramp,
        "seconds": round(elapsed, 1),
        "outcome": dict(outcome),
        "health_probes": len(times),
        "health_failures": health_failures,
        "health_p50_ms": round(statistics.median(times) * 1000, 1),
        "health_p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 1),
        "health_max_ms": round(times[-1] * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=3000)
    parser.add_argument("--ramp", type=float, default=10.0)
    parser.add_argument("--max-inflight", type=int, help="the router's --max-inflight")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()
    if args.max_inflight:
        os.environ["LLMLB_PROXY_MAX_INFLIGHT"] = str(args.max_inflight)
    with tempfile.TemporaryDirectory(prefix="llmlb-overload-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            mock = fleet.mock()
            router = fleet.router(mock.url + "/_mock/long/drip3000")
            load_before = os.getloadavg()
            cpu_before = tree_cpu_s(router.pid)
            result = asyncio.run(load(router.url, router.key, args.streams, args.ramp))
            result["router_cpu_s"] = round(tree_cpu_s(router.pid) - cpu_before, 1)
            result["loadavg_before"] = [round(x, 2) for x in load_before]
            result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            result["cpus"] = os.cpu_count()
            status, body = http("GET", router.url + "/v0/nodes", key=ADMIN_KEY)
            result["node_status_after"] = [n["status"] for n in json.loads(body)["nodes"]]
        finally:
            fleet.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
