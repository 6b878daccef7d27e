"""Tenancy benchmark: key limits, fair share and usage accounting on real routers over the
project's mock backend (``bench/router/mock_backend.py``).

- ``cpu``: router CPU per request of a key with limits (rpm, tpm, max_parallel and a budget,
  all far above the load, so every request is admitted and counted) against a key without,
  on one router: ``wrk`` non-streaming c=32 and SSE streams c=32, rounds alternating.
- ``fair``: a node with 8 slots answering after 200 ms; key A keeps 80 streams open (10x
  what the node serves, ``wrk``), key B sends one request at a time. B's time to first
  byte, alone and under A's flood: with A and B as two keys (weighted fair queuing) and,
  for comparison, B sending with A's key (one flow: first come, first served).
- ``rpm``: two routers on one PostgreSQL, a key with ``rpm``, 8 client threads split over
  both for ``--rpm-seconds``: the share of ``rpm x minutes`` the fleet accepted.
- ``tokens``: streamed and whole answers; the tokens ``GET /v0/usage`` counts for the key
  against the sum of the usage the clients saw.

    python bench/tenancy/run.py [--duration 8] [--rounds 3] [--rpm-seconds 120] [--only ...]

Writes ``bench/tenancy/results.json``; ``bench/tenancy/README.md`` has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from bench.router.run import (  # noqa: E402 - after the path is set
    ADMIN_KEY,
    MODEL,
    PROMPT,
    Fleet,
    Setup,
    free_port,
    http,
    run_streams,
    run_wrk,
    wait_http,
)

FAIR_MODEL = "fair/model"
FAIR_SLOTS = 8
FAIR_DELAY_MS = 200
LIMITS = {
    "rpm": 10**9,
    "tpm": 10**9,
    "max_parallel": 10**6,
    "budget_tokens": 10**15,
    "budget_period": "month",
}


def new_key(url: str, **limits: object) -> str:
    status, body = http("POST", url + "/v0/keys", {"scope": "api", **limits}, ADMIN_KEY)
    assert status == 201, (status, body)
    return json.loads(body)["key"]


def register(fleet: Fleet, url: str, node_id: str, node_url: str, model: str, slots: int) -> None:
    """Register a node for ``model`` on the router at ``url`` and keep it alive."""
    node = {
        "node_id": node_id,
        "url": node_url,
        "runtimes": ["llama_cpp"],
        "gpu": {"backend": "cpu"},
        "slots": slots,
        "models": [{"id": model, "state": "ready"}],
    }
    status, body = http("POST", url + "/v0/nodes", node, ADMIN_KEY)
    assert status in (200, 201), (status, body)
    beat = {"slots": slots, "models": [{"id": model, "state": "ready"}]}

    def heartbeat() -> None:
        while not fleet._stop.wait(1.0):
            http("POST", f"{url}/v0/nodes/{node_id}/heartbeat", beat, ADMIN_KEY)

    threading.Thread(target=heartbeat, daemon=True).start()


def wait_routed(url: str, key: str, model: str) -> None:
    deadline = time.monotonic() + 30
    while http("POST", url + "/v1/chat/completions", {"model": model}, key)[0] != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model} never routed")
        time.sleep(0.2)


# -- cpu ---------------------------------------------------------------------------------


def bench_cpu(fleet: Fleet, duration: float, rounds: int) -> dict:
    backend = fleet.mock()
    plain = fleet.router(backend.url)
    limited = Setup("limited", plain.url, new_key(plain.url, **LIMITS), MODEL, plain.pid)
    plain.name = "unlimited"
    runs = []
    for rnd in range(rounds):
        for setup in (plain, limited) if rnd % 2 == 0 else (limited, plain):
            runs.append(run_wrk(setup, 32, duration, rnd, fleet.workdir))
            runs.append(run_streams(setup, 32, duration, rnd))
    out: dict = {}
    for workload in ("chat", "stream"):
        for name in ("unlimited", "limited"):
            mine = [r for r in runs if r.setup == name and r.workload == workload and r.counted]
            mine = mine or [r for r in runs if r.setup == name and r.workload == workload]
            out[f"{workload}_{name}_cpu_ms"] = statistics.median(
                r.cpu_ms_per_req for r in mine if r.cpu_ms_per_req
            )
            out[f"{workload}_{name}_rps"] = statistics.median(r.rps for r in mine)
        out[f"{workload}_ratio"] = (
            out[f"{workload}_limited_cpu_ms"] / out[f"{workload}_unlimited_cpu_ms"]
        )
    out["uncounted_runs"] = sum(not r.counted for r in runs)
    return out


# -- fair share ------------------------------------------------------------------------------


async def _ttfb(session: aiohttp.ClientSession, url: str, key: str, model: str) -> float:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    start = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        await resp.content.readany()
        first = time.perf_counter() - start
        assert resp.status == 200, resp.status
        await resp.read()
    return first


async def _trickle(url: str, key: str, seconds: float) -> list[float]:
    """B's times to first byte, one request at a time, 0.2 s apart."""
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        seen = []
        while time.monotonic() < stop:
            seen.append(await _ttfb(session, url, key, FAIR_MODEL))
            await asyncio.sleep(0.2)
    return seen


def _fair(fleet: Fleet, url: str, key_a: str | None, key_b: str, seconds: float) -> list[float]:
    """B's times to first byte while A (if given) keeps 10 streams per slot open (``wrk``,
    so the flood costs the measuring client nothing)."""
    if key_a is None:
        return asyncio.run(_trickle(url, key_b, seconds))
    body = json.dumps({"model": FAIR_MODEL, "stream": True, "messages": [PROMPT]})
    script = fleet.workdir / "flood.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key_a}"\n'
    )
    flood = subprocess.Popen(
        ["wrk", "-t1", f"-c{FAIR_SLOTS * 10}", f"-d{round(seconds) + 2}s", "--timeout", "60s", "-s",
         str(script), url + "/v1/chat/completions"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # the queue fills first
        return asyncio.run(_trickle(url, key_b, seconds))
    finally:
        flood.wait()


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def bench_fair(fleet: Fleet, seconds: float) -> dict:
    backend = fleet.mock()
    router = fleet.router(backend.url, name="fair")
    node_url = f"{backend.url}/_mock/fair/sleep{FAIR_DELAY_MS}"
    register(fleet, router.url, "fair-node", node_url, FAIR_MODEL, FAIR_SLOTS)
    key_a, key_b = new_key(router.url), new_key(router.url)
    wait_routed(router.url, key_b, FAIR_MODEL)
    alone = _fair(fleet, router.url, None, key_b, seconds)
    shared = _fair(fleet, router.url, key_a, key_b, seconds)
    fifo = _fair(fleet, router.url, key_a, key_a, seconds)  # B as A: one flow
    return {
        "b_alone_p90_ms": _p90(alone) * 1e3,
        "b_flooded_p90_ms": _p90(shared) * 1e3,
        "b_same_key_fifo_p90_ms": _p90(fifo) * 1e3,
        "ratio": _p90(shared) / _p90(alone),
        "b_requests": [len(alone), len(shared), len(fifo)],
    }


# -- rpm across two routers ------------------------------------------------------------------


def bench_rpm(fleet: Fleet, seconds: float, rpm: int) -> dict:
    from tests.postgres_fixtures import make_server

    server = make_server()
    try:
        database = server.create_database()
        backend = fleet.mock()
        urls = []
        for index in range(2):
            port = free_port()
            env = {
                "LLMLB_HOME": str(fleet.workdir / f"rpm-home{index}"),
                "LLMLB_ADMIN_KEY": ADMIN_KEY,
                "LLMLB_NODE_APPROVAL": "auto",
            }
            argv = [sys.executable, "-m", "llmlb.cli.main", "router", "--port", str(port)]
            proc = fleet.spawn([*argv, "--db", database], f"rpm-router{index}", env)
            urls.append(f"http://127.0.0.1:{port}")
            wait_http(urls[-1] + "/health", proc)
        register(fleet, urls[0], "rpm-node", backend.url, MODEL, 4096)
        warm = new_key(urls[0])
        for url in urls:
            wait_routed(url, warm, MODEL)
        key = new_key(urls[0], rpm=rpm)
        counts = {"accepted": 0, "refused": 0, "other": 0}
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def client(index: int) -> None:
            url = urls[index % 2]
            while time.monotonic() < stop:
                status, _ = http("POST", url + "/v1/chat/completions", {"model": MODEL}, key)
                kind = "accepted" if status == 200 else "refused" if status == 429 else "other"
                with lock:
                    counts[kind] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        allowed = rpm * seconds / 60
        return {**counts, "rpm": rpm, "seconds": seconds, "share": counts["accepted"] / allowed}
    finally:
        server.remove()


# -- exact token accounting ------------------------------------------------------------------


def bench_tokens(fleet: Fleet, requests: int) -> dict:
    backend = fleet.mock()
    router = fleet.router(backend.url, name="tokens")
    key = new_key(router.url, tpm=10**9)
    seen = 0
    for i in range(requests):
        body: dict = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        status, raw = http("POST", router.url + "/v1/chat/completions", body, key)
        assert status == 200, status
        if i % 2:
            for line in raw.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage"' in line:
                    seen += json.loads(line[6:])["usage"]["total_tokens"]
        else:
            seen += json.loads(raw)["usage"]["total_tokens"]
    status, raw = http("GET", router.url + "/v0/usage/self?group_by=key", None, key)
    counted = json.loads(raw)["usage"][0]["total_tokens"]
    return {"requests": requests, "client_tokens": seen, "counted_tokens": counted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per cpu run (8)")
    parser.add_argument("--rounds", type=int, default=3, help="cpu rounds (3)")
    parser.add_argument("--fair-seconds", type=float, default=20.0, help="per fair phase (20)")
    parser.add_argument("--rpm-seconds", type=float, default=120.0, help="rpm phase (120)")
    parser.add_argument("--rpm", type=int, default=600, help="the key's rpm (600)")
    parser.add_argument("--only", nargs="*", choices=["cpu", "fair", "rpm", "tokens"])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    wanted = set(args.only or ["cpu", "fair", "rpm", "tokens"])
    results: dict = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="llmlb-tenancy-") as tmp:
        for name in ("tokens", "fair", "cpu", "rpm"):
            if name not in wanted:
                continue
            fleet = Fleet(Path(tmp) / name)
            fleet.workdir.mkdir()
            try:
                if name == "cpu":
                    results[name] = bench_cpu(fleet, args.duration, args.rounds)
                elif name == "fair":
                    results[name] = bench_fair(fleet, args.fair_seconds)
                elif name == "rpm":
                    results[name] = bench_rpm(fleet, args.rpm_seconds, args.rpm)
                else:
                    results[name] = bench_tokens(fleet, 40)
            finally:
                fleet.stop()
            results[name]["load_after"] = os.getloadavg()
            print(name, json.dumps(results[name]), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
