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
- ``tpm``: the same two routers, a key with ``tpm``, 8 client threads for ``--tpm-seconds``,
  twice: requests reserving more than they use, then less; the tokens the clients were
  given, the most in any 60 seconds against ``tpm`` and the bound the design states.
- ``budget``: the same, keys with a small daily ``budget_tokens`` (``--budget``, 3 keys per
  budget, one after another): the tokens given against the budget and the bound stated in
  ``llmlb.router.control.quota`` (the budget + one request's reservation).
- ``parallel``: the same two routers in front of a backend answering after
  ``--parallel-delay-ms`` that counts the requests it holds at once
  (``bench/tenancy/slow_backend.py``), a key with ``max_parallel`` (``--max-parallel``), 8
  client threads over both routers for ``--parallel-seconds``, retrying at once when
  refused: the most requests of the key the backend held at once, and the accepted rate
  against ``max_parallel`` / the backend's delay.
- ``tokens``: streamed and whole answers; the tokens ``GET /v0/usage`` counts for the key
  against the sum of the usage the clients saw.

    python bench/tenancy/run.py [--duration 8] [--rounds 3] [--rpm-seconds 120]
        [--tpm 30000] [--tpm-seconds 120] [--budget 5000 50000] [--budget-seconds 15]
        [--max-parallel 4] [--parallel-seconds 60] [--parallel-delay-ms 200] [--only ...]

Updates the phases it ran in ``bench/tenancy/results.json`` (each with the load average
before and after); ``bench/tenancy/README.md`` has the figures.
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


# -- limits across two routers on one PostgreSQL ---------------------------------------------


def _two_routers(
    fleet: Fleet, database: str, name: str, backend_url: str | None = None
) -> list[str]:
    """Two routers on ``database`` in front of one node with 4096 slots: the mock backend,
    or the one at ``backend_url``."""
    backend_url = backend_url or fleet.mock().url
    urls = []
    for index in range(2):
        port = free_port()
        env = {
            "LLMLB_HOME": str(fleet.workdir / f"{name}-home{index}"),
            "LLMLB_ADMIN_KEY": ADMIN_KEY,
            "LLMLB_NODE_APPROVAL": "auto",
        }
        argv = [sys.executable, "-m", "llmlb.cli.main", "router", "--port", str(port)]
        proc = fleet.spawn([*argv, "--db", database], f"{name}-router{index}", env)
        urls.append(f"http://127.0.0.1:{port}")
        wait_http(urls[-1] + "/health", proc)
    register(fleet, urls[0], f"{name}-node", backend_url, MODEL, 4096)
    warm = new_key(urls[0])
    for url in urls:
        wait_routed(url, warm, MODEL)
    return urls


# (seconds since the start when sent, router index, HTTP status, total_tokens the client saw)
Outcome = tuple[float, int, int | None, int]


def _hammer(urls: list[str], key: str, body: dict, seconds: float, threads: int = 8) -> list:
    """``threads`` clients, split over ``urls``, send ``body`` with ``key`` back to back for
    ``seconds``; every answer as an :data:`Outcome`."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + seconds

    def client(index: int) -> None:
        url = urls[index % len(urls)] + "/v1/chat/completions"
        mine = []
        while (sent := time.monotonic()) < stop:
            status, raw = http("POST", url, body, key)
            tokens = json.loads(raw)["usage"]["total_tokens"] if status == 200 else 0
            mine.append((sent - start, index % len(urls), status, tokens))
        with lock:
            outcomes.extend(mine)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sorted(outcomes)


def _counts(outcomes: list[Outcome]) -> dict:
    accepted = [o for o in outcomes if o[2] == 200]
    return {
        "accepted": len(accepted),
        "refused": sum(o[2] == 429 for o in outcomes),
        "other": sum(o[2] not in (200, 429) for o in outcomes),
        # what the others were (None: no answer within 10 s, or the connection failed)
        "other_statuses": {
            str(status): sum(o[2] == status for o in outcomes)
            for status in {o[2] for o in outcomes} - {200, 429}
        },
        "accepted_per_router": [sum(o[1] == r for o in accepted) for r in (0, 1)],
        "tokens": sum(o[3] for o in accepted),
        "tokens_per_router": [sum(o[3] for o in accepted if o[1] == r) for r in (0, 1)],
    }


def _max_in_span(outcomes: list[Outcome], span: float = 60.0) -> int:
    """The most tokens accepted in any ``span`` seconds (by the clients' send times)."""
    accepted = [(o[0], o[3]) for o in outcomes if o[2] == 200]
    best = total = first = 0
    for at, tokens in accepted:
        total += tokens
        while accepted[first][0] <= at - span:
            total -= accepted[first][1]
            first += 1
        best = max(best, total)
    return best


def _reserved(body: dict) -> int:
    """What the router reserves for ``body`` as the bench's client sends it."""
    from llmlb.router.proxy.admission import estimate_tokens

    return estimate_tokens(json.dumps(body).encode(), body)


def bench_rpm(fleet: Fleet, seconds: float, rpm: int) -> dict:
    from tests.postgres_fixtures import make_server

    server = make_server()
    try:
        urls = _two_routers(fleet, server.create_database(), "rpm")
        key = new_key(urls[0], rpm=rpm)
        counts = _counts(_hammer(urls, key, {"model": MODEL}, seconds))
        allowed = rpm * seconds / 60
        return {**counts, "rpm": rpm, "seconds": seconds, "share": counts["accepted"] / allowed}
    finally:
        server.remove()


def bench_tpm(fleet: Fleet, seconds: float, tpm: int) -> dict:
    """A key with ``tpm``, 8 clients over two routers for ``seconds``, twice: requests that
    reserve more than the 21 tokens they use (``max_tokens`` 32), and requests that reserve
    less (``max_tokens`` 1: the usage the node reports beyond the reservation is charged
    after the answer)."""
    from llmlb.router.control.quota import slice_size

    from tests.postgres_fixtures import make_server

    server = make_server()
    try:
        urls = _two_routers(fleet, server.create_database(), "tpm")
        out: dict = {"tpm": tpm, "seconds": seconds, "slice": slice_size(tpm, 1)}
        for case, max_tokens in (("reserved", 32), ("under_reserved", 1)):
            body = {"model": MODEL, "max_tokens": max_tokens}
            key = new_key(urls[0], tpm=tpm)
            outcomes = _hammer(urls, key, body, seconds)
            counts = _counts(outcomes)
            reserved = _reserved(body)
            used = max(o[3] for o in outcomes if o[2] == 200)
            # The design's bound on tokens in any minute: the limit, plus a router's current
            # slice each (granted, maybe not yet returned), plus what the requests in flight
            # (one per client) use beyond their reservation.
            bound = tpm + 2 * out["slice"] + 8 * max(0, used - reserved)
            peak = _max_in_span(outcomes)
            out[case] = {
                **counts,
                "max_tokens": max_tokens,
                "reserved_per_request": reserved,
                "used_per_request": used,
                "max_tokens_in_60s": peak,
                "max_60s_over_limit": peak / tpm,
                "share_of_limit_x_minutes": counts["tokens"] / (tpm * seconds / 60),
                "stated_bound_60s": bound,
            }
            print(case, json.dumps(out[case]), flush=True)
        return out
    finally:
        server.remove()


def bench_budget(fleet: Fleet, seconds: float, budgets: list[int], trials: int) -> dict:
    """For each of ``budgets``, ``trials`` keys with that daily ``budget_tokens``, one after
    another, each hammered by 8 clients over two routers for ``seconds``: the tokens the
    clients were given against the budget. Each router admits against leases of the
    budget (slices of budget / 64 from ``budget_leases``); the stated bound is the budget +
    one request's reservation (these requests use less than they reserve)."""
    from tests.postgres_fixtures import make_server

    server = make_server()
    try:
        urls = _two_routers(fleet, server.create_database(), "budget")
        body = {"model": MODEL, "max_tokens": 32}
        reserved = _reserved(body)
        out: dict = {"seconds": seconds, "reserved_per_request": reserved, "budgets": {}}
        for budget in budgets:
            runs = []
            for _ in range(trials):
                key = new_key(urls[0], budget_tokens=budget, budget_period="day")
                outcomes = _hammer(urls, key, body, seconds)
                accepted = [o for o in outcomes if o[2] == 200]
                counts = _counts(outcomes)
                # A router refuses once the fleet leased the budget out; what the other
                # router still held comes back after 5 s idle and may admit a last request.
                refused_at = next((o[0] for o in outcomes if o[2] == 429), None)
                spent = sum(o[3] for o in accepted if refused_at is None or o[0] < refused_at)
                run = {
                    **counts,
                    "over_budget": counts["tokens"] / budget,
                    "bound": budget + reserved,
                    "within_bound": counts["tokens"] <= budget + reserved,
                    "last_accepted_at_s": accepted[-1][0] if accepted else None,
                    "first_refused_at_s": refused_at,
                    "tokens_before_first_refusal": spent,
                    # how fast the fleet spent it, until the first refusal
                    "tokens_per_s": spent / max(refused_at or seconds, 1e-3),
                }
                runs.append(run)
                print("budget", budget, json.dumps(run), flush=True)
            out["budgets"][str(budget)] = {
                "runs": runs,
                "median_over_budget": statistics.median(r["over_budget"] for r in runs),
                "max_over_budget": max(r["over_budget"] for r in runs),
            }
        return out
    finally:
        server.remove()


def bench_parallel(fleet: Fleet, seconds: float, max_parallel: int, delay_ms: float) -> dict:
    """A key with ``max_parallel``, 8 clients over two routers for ``seconds`` in front of a
    backend answering after ``delay_ms`` and counting what it holds at once."""
    from tests.postgres_fixtures import make_server

    port = free_port()
    argv = [sys.executable, str(HERE / "slow_backend.py"), "--port", str(port)]
    proc = fleet.spawn([*argv, "--delay-ms", str(delay_ms)], "slow-backend")
    backend = f"http://127.0.0.1:{port}"
    wait_http(backend + "/health", proc)
    server = make_server()
    try:
        urls = _two_routers(fleet, server.create_database(), "parallel", backend)
        key = new_key(urls[0], max_parallel=max_parallel)
        for url in urls:
            wait_routed(url, key, MODEL)
        http("POST", backend + "/_inflight/reset")
        outcomes = _hammer(urls, key, {"model": MODEL}, seconds)
        status, raw = http("GET", backend + "/_inflight")
        at_backend = json.loads(raw)
        counts = _counts(outcomes)
        ideal = max_parallel / (delay_ms / 1000)
        rate = counts["accepted"] / seconds
        return {
            **{k: v for k, v in counts.items() if not k.startswith("tokens")},
            "max_parallel": max_parallel,
            "seconds": seconds,
            "delay_ms": delay_ms,
            "most_in_flight_at_backend": at_backend["max"],
            "backend_requests": at_backend["requests"],
            "accepted_per_s": rate,
            "ideal_per_s": ideal,
            "share_of_ideal": rate / ideal,
            "refused_per_s": counts["refused"] / seconds,
        }
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


PHASES = ("tokens", "fair", "cpu", "rpm", "tpm", "budget", "parallel")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per cpu run (8)")
    parser.add_argument("--rounds", type=int, default=3, help="cpu rounds (3)")
    parser.add_argument("--fair-seconds", type=float, default=20.0, help="per fair phase (20)")
    parser.add_argument("--rpm-seconds", type=float, default=120.0, help="rpm phase (120)")
    parser.add_argument("--rpm", type=int, default=600, help="the key's rpm (600)")
    parser.add_argument("--tpm-seconds", type=float, default=120.0, help="per tpm case (120)")
    parser.add_argument("--tpm", type=int, default=30000, help="the key's tpm (30000)")
    parser.add_argument("--budget-seconds", type=float, default=15.0, help="per budget key (15)")
    parser.add_argument(
        "--budget", type=int, nargs="+", default=[5000, 50000], help="daily budgets (5000 50000)"
    )
    parser.add_argument("--budget-trials", type=int, default=3, help="keys per budget (3)")
    parser.add_argument("--max-parallel", type=int, default=4, help="the key's (4)")
    parser.add_argument("--parallel-seconds", type=float, default=60.0, help="phase (60)")
    parser.add_argument(
        "--parallel-delay-ms", type=float, default=200.0, help="the backend's delay (200)"
    )
    parser.add_argument("--only", nargs="*", choices=[*PHASES])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    wanted = set(args.only or PHASES)
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="llmlb-tenancy-") as tmp:
        for name in PHASES:
            if name not in wanted:
                continue
            load_before = os.getloadavg()
            fleet = Fleet(Path(tmp) / name)
            fleet.workdir.mkdir()
            try:
                if name == "cpu":
                    results[name] = bench_cpu(fleet, args.duration, args.rounds)
                elif name == "fair":
                    results[name] = bench_fair(fleet, args.fair_seconds)
                elif name == "rpm":
                    results[name] = bench_rpm(fleet, args.rpm_seconds, args.rpm)
                elif name == "tpm":
                    results[name] = bench_tpm(fleet, args.tpm_seconds, args.tpm)
                elif name == "parallel":
                    results[name] = bench_parallel(
                        fleet, args.parallel_seconds, args.max_parallel, args.parallel_delay_ms
                    )
                elif name == "budget":
                    results[name] = bench_budget(
                        fleet, args.budget_seconds, args.budget, args.budget_trials
                    )
                else:
                    results[name] = bench_tokens(fleet, 40)
            finally:
                fleet.stop()
            results[name]["load_before"] = load_before
            results[name]["load_after"] = os.getloadavg()
            results[name]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            print(name, json.dumps(results[name]), flush=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # each phase as it ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
