"""Fleet scale-out benchmark: time from registration until all N nodes have a model ready,
and the bytes the hub served, with and without peer distribution (the swarm: nodes trade
verified pieces while they download).

Each case runs in a fresh temporary directory: the hub stand-in serving the real Gemma 3 270M
Q4_K_M GGUF (about 253 MB) capped at ``--cap`` per connection and, in the ``uplink`` scenario,
at ``--uplink`` for all connections together (a site's link to the hub), a router, N nodes
with their own stores on loopback, each with an upload budget of ``--peer-upload-mbps``
(default 1000: a 1 Gbit/s LAN port). The clock starts at ``POST /v1/models/register`` and
stops when every node reports the model ready (downloaded, verified, promoted and loaded);
hub bytes are the body bytes of the stand-in's request log. ``hub`` mode nodes run with
``--no-peer-fetch`` (every node from the hub).

Scenarios: ``uplink`` (a: 25 MB/s per connection, 40 MB/s in all), ``percon`` (b: 25 MB/s per
connection, no total cap), ``killed`` (a, N nodes, one node SIGKILLed once the survivors
hold a quarter of the model: the clock stops when every survivor is ready), ``liar`` (a, N
nodes and a fake node listed as holding the model ready that serves every byte flipped, with
the true piece hashes).

    .venv/bin/python bench/fleet/run.py                       # N = 1, 2, 4; uplink+percon
    .venv/bin/python bench/fleet/run.py --nodes 1,2,4,8 --runs 3 --out bench/results/fleet.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import GEMMA_NAME, assemble_gemma  # noqa: E402
from tests.hub_fixtures import hub_argv, make_repo  # noqa: E402
from tests.peer_fixtures import FakePeer  # noqa: E402
from tests.procs import LLMLB, free_port, http_status, spawner, wait_until  # noqa: E402
from tests.router_fixtures import call  # noqa: E402

SCENARIOS = {  # name -> (per-connection cap, total cap, event)
    "uplink": ("25M", "40M", None),
    "percon": ("25M", None, None),
    "killed": ("25M", "40M", "kill"),
    "liar": ("25M", "40M", "liar"),
}

ADMIN = "sk-bench-fleet-admin-0123456789"
REPO = "google/gemma-3-270m-it-gguf"
MODEL = "google/gemma-3-270m-it-gguf"


def _hub_bytes(log: Path) -> int:
    total = 0
    for line in log.read_text().splitlines():
        entry = orjson.loads(line)
        if "/resolve/" in entry["path"]:
            total += entry.get("bytes") or 0
    return total


_DOWNLOADED = re.compile(r"downloaded in ([0-9.]+)s")
_READY_AFTER = re.compile(r"ready ([0-9.]+)s after its last byte")
_TRANSFER = re.compile(r"MiB in ([0-9.]+)s.*hash tail ([0-9.]+)s")


def _phases(log: str) -> dict:
    """What a node's log says of its download: seconds downloading (transfer and hash tail
    of the GGUF, the whole download), and from its last byte to ready (load, promotion)."""

    def last(pattern: re.Pattern, group: int = 1) -> float | None:
        found = pattern.findall(log)
        if not found:
            return None
        value = found[-1]
        return float(value if isinstance(value, str) else value[group - 1])

    return {
        "transfer_s": last(_TRANSFER, 1),
        "hash_tail_s": last(_TRANSFER, 2),
        "download_s": last(_DOWNLOADED),
        "ready_after_last_byte_s": last(_READY_AFTER),
    }


def _state(url: str) -> dict:
    reply = call(url, "GET", "/api/models/status")
    return next((m for m in reply.json["models"] if m["id"] == MODEL), {})


def one_case(
    work: Path,
    gguf: Path,
    nodes: int,
    peers: bool,
    cap: str,
    upload_mbps: str | None = None,
    uplink: str | None = None,
    event: str | None = None,
) -> dict:
    """One fleet of ``nodes`` nodes: seconds to all ready, hub bytes, bytes by source."""
    spawn, stop_all = spawner(work)
    liar: FakePeer | None = None
    try:
        root = work / "hub"
        make_repo(root, REPO, {GEMMA_NAME: gguf})
        log = work / "hub.jsonl"
        hub_port = free_port()
        hub = f"http://127.0.0.1:{hub_port}"
        caps = ["--bandwidth", cap] + (["--total-bandwidth", uplink] if uplink else [])
        spawn(hub_argv(hub_port, root, *caps, "--log-requests", str(log)), name="hub")
        wait_until(lambda: http_status(f"{hub}/health") == 200, timeout=60)
        port = free_port()
        router = f"http://127.0.0.1:{port}"
        env = {
            "LLMLB_HOME": str(work / "home"),
            "LLMLB_ADMIN_KEY": ADMIN,
            "LLMLB_NODE_APPROVAL": "auto",  # the bench's nodes serve at once
            "HF_ENDPOINT": hub,
            "LLMLB_HEARTBEAT_INTERVAL_S": "0.5",
        }
        argv = [*LLMLB, "router", "--host", "127.0.0.1", "--port", str(port)]
        spawn(argv, env=env, name="router")
        wait_until(lambda: http_status(f"{router}/health") == 200, timeout=60)
        key = call(router, "POST", "/v0/keys", ADMIN, {"scope": "node"}).json["key"]
        urls, procs = [], []
        for index in range(nodes):
            node_port = free_port()
            argv = [
                *LLMLB, "node", "--router", router, "--api-key", key, "--host", "127.0.0.1",
                "--port", str(node_port), "--models-dir", str(work / f"store{index}"),
                "--ctx-size", "512", "--threads", "1",
            ]  # fmt: skip
            if not peers:
                argv.append("--no-peer-fetch")
            if upload_mbps:
                argv += ["--peer-upload-mbps", upload_mbps]
            procs.append(spawn(argv, env={"HF_ENDPOINT": hub}, name=f"node{index}"))
            urls.append(f"http://127.0.0.1:{node_port}")
        for url in urls:
            wait_until(lambda u=url: http_status(f"{u}/ready") == 200, timeout=120)
        if event == "liar":  # listed as holding the model ready at the hub's revision
            info = call(hub, "GET", f"/api/models/{REPO}", None).json
            liar = FakePeer(router, key, {(MODEL, GEMMA_NAME): gguf}, {MODEL: info["sha"]})
            liar.__enter__()
            wait_until(lambda: liar.node_id in str(call(router, "GET", "/v0/nodes", ADMIN).json))
        started = time.monotonic()
        reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": REPO})
        assert reply.status == 201, reply.body
        killed_at = None
        if event == "kill":
            size = gguf.stat().st_size

            def quarter() -> bool:
                done = [(_state(u).get("progress") or {}).get("bytes") or 0 for u in urls[1:]]
                return min(done) >= size / 4

            wait_until(quarter, timeout=300, interval=0.02, message="a quarter on the survivors")
            procs[0].kill()
            killed_at = time.monotonic() - started
            urls = urls[1:]

        def all_ready() -> bool:
            return all(_state(u).get("state") == "ready" for u in urls)

        wait_until(all_ready, timeout=900, interval=0.1, message="all nodes ready")
        seconds = time.monotonic() - started
        time.sleep(1.5)  # let the last heartbeats carry the byte counters
        statuses = [_state(u) for u in urls]
        phases = [_phases(proc.log()) for proc in procs if proc.alive()]
        return {
            "nodes": nodes,
            "peers": peers,
            "event": event,
            "killed_at_s": killed_at,
            "seconds": seconds,
            "hub_bytes": _hub_bytes(log),
            "model_bytes": gguf.stat().st_size,
            "from_peers": sum(s.get("bytes_from_peers") or 0 for s in statuses),
            "from_hub": sum(s.get("bytes_from_hub") or 0 for s in statuses),
            "by_source": [s.get("bytes_by_source") or {} for s in statuses],
            "liar_asked": len(liar.requests) if liar is not None else None,
            "phases": phases,
        }
    finally:
        if liar is not None:
            liar.__exit__(None, None, None)
        stop_all()


def render(results: list[dict]) -> str:
    """The README table: median seconds and hub bytes per case."""
    lines = [
        "| Scenario | Nodes | Peers | Time to all ready (median, min–max, s) | vs. 1 node "
        "| Hub bytes / model size (max) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    single = {
        (r["scenario"], r["peers"]): statistics.median(r["seconds"])
        for r in results
        if r["nodes"] == 1
    }
    for r in results:
        median = statistics.median(r["seconds"])
        base_key = ("uplink" if r["scenario"] in ("killed", "liar") else r["scenario"], r["peers"])
        base = single.get(base_key)
        ratio = f"{median / base:.2f}x" if base else "—"
        lines.append(
            f"| {r['scenario']} | {r['nodes']} | {'yes' if r['peers'] else 'no'} | {median:.2f} "
            f"({min(r['seconds']):.2f}–{max(r['seconds']):.2f}) | {ratio} "
            f"| {max(r['hub_ratio']):.3f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,4", help="fleet sizes (1,2,4)")
    parser.add_argument("--runs", type=int, default=1, help="runs per case (1)")
    parser.add_argument(
        "--scenarios", default="uplink,percon", help=f"of {', '.join(SCENARIOS)} (uplink,percon)"
    )
    parser.add_argument("--event-nodes", type=int, default=4, help="fleet size of killed/liar")
    parser.add_argument("--modes", default="peers,hub", help="peers and/or hub (both)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--peer-upload-mbps", default="1000", help="the nodes' upload budget (1000: 1 Gbit/s)"
    )
    args = parser.parse_args()
    gguf = assemble_gemma()
    load_before = os.getloadavg()
    cases = []
    for scenario in args.scenarios.split(","):
        cap, uplink, event = SCENARIOS[scenario]
        if event is not None:
            cases.append((scenario, args.event_nodes, True, cap, uplink, event))
            continue
        for n in (int(x) for x in args.nodes.split(",")):
            for mode in args.modes.split(","):
                cases.append((scenario, n, mode == "peers", cap, uplink, event))
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    for _ in range(args.runs):  # rounds: every case once per round, in turn
        for case in cases:
            scenario, n, peers, cap, uplink, event = case
            work = Path(tempfile.mkdtemp(prefix="llmlb-fleet-"))
            try:
                run = one_case(work, gguf, n, peers, cap, args.peer_upload_mbps, uplink, event)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            run["scenario"] = scenario
            run["loadavg_after"] = os.getloadavg()[0]
            runs[case].append(run)
            print(orjson.dumps(run).decode(), flush=True)
    results = [
        {
            "scenario": case[0],
            "nodes": case[1],
            "peers": case[2],
            "cap": case[3],
            "uplink": case[4],
            "seconds": [r["seconds"] for r in case_runs],
            "hub_ratio": [r["hub_bytes"] / r["model_bytes"] for r in case_runs],
            "runs": case_runs,
        }
        for case, case_runs in runs.items()
    ]
    table = render(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "loadavg_before": load_before,
            "peer_upload_mbps": args.peer_upload_mbps,
            "cpus": os.cpu_count(),
        }
        out.write_bytes(
            orjson.dumps(
                {"results": results, "loadavg": os.getloadavg(), "meta": meta},
                option=orjson.OPT_INDENT_2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
