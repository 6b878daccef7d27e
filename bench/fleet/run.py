"""Fleet scale-out benchmark: time from registration until all N nodes have a model ready,
and the bytes the hub served, with and without peer distribution.

Each case runs in a fresh temporary directory: the hub stand-in serving the real Gemma 3 270M
Q4_K_M GGUF (about 253 MB) capped at ``--cap`` per connection, a router, N nodes with their
own stores on loopback. The clock starts at ``POST /v1/models/register`` and stops when the
router reports the model ready on all N nodes (each node downloads, verifies, promotes and
loads it); hub bytes are the body bytes of the stand-in's request log. ``--no-peers`` nodes
run with ``--no-peer-fetch`` (today's behaviour: every node from the hub).

    .venv/bin/python bench/fleet/run.py                       # N = 1, 2, 4; both modes
    .venv/bin/python bench/fleet/run.py --nodes 1,2,4,8 --runs 3 --out bench/results/fleet.json
"""

from __future__ import annotations

import argparse
import os
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
from tests.procs import LLMLB, free_port, http_status, spawner, wait_until  # noqa: E402
from tests.router_fixtures import call  # noqa: E402

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


def one_case(
    work: Path, gguf: Path, nodes: int, peers: bool, cap: str, upload_mbps: str | None = None
) -> dict:
    """One fleet of ``nodes`` nodes: seconds to all ready, hub bytes, bytes by source."""
    spawn, stop_all = spawner(work)
    try:
        root = work / "hub"
        make_repo(root, REPO, {GEMMA_NAME: gguf})
        log = work / "hub.jsonl"
        hub_port = free_port()
        hub = f"http://127.0.0.1:{hub_port}"
        spawn(hub_argv(hub_port, root, "--bandwidth", cap, "--log-requests", str(log)), name="hub")
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
        urls = []
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
            spawn(argv, env={"HF_ENDPOINT": hub}, name=f"node{index}")
            urls.append(f"http://127.0.0.1:{node_port}")
        for url in urls:
            wait_until(lambda u=url: http_status(f"{u}/ready") == 200, timeout=120)
        started = time.monotonic()
        reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": REPO})
        assert reply.status == 201, reply.body

        def all_ready() -> bool:
            entry = call(router, "GET", f"/v1/models/{MODEL}", ADMIN).json or {}
            return entry.get("nodes_ready", 0) >= nodes

        wait_until(all_ready, timeout=900, interval=0.1, message="all nodes ready")
        seconds = time.monotonic() - started
        time.sleep(1.5)  # let the last heartbeats carry the byte counters
        listed = call(router, "GET", "/v0/nodes", ADMIN).json["nodes"]
        return {
            "nodes": nodes,
            "peers": peers,
            "seconds": seconds,
            "hub_bytes": _hub_bytes(log),
            "model_bytes": gguf.stat().st_size,
            "from_peers": sum(n["transfer"]["bytes_from_peers"] for n in listed),
            "from_hub": sum(n["transfer"]["bytes_from_hub"] for n in listed),
        }
    finally:
        stop_all()


def render(results: list[dict]) -> str:
    """The README table: median seconds and hub bytes per case."""
    lines = [
        "| Nodes | Peers | Time to all ready (median, s) | vs. 1 node | Hub bytes / model size |",
        "|---:|---|---:|---:|---:|",
    ]
    single = {r["peers"]: statistics.median(r["seconds"]) for r in results if r["nodes"] == 1}
    for r in results:
        median = statistics.median(r["seconds"])
        base = single.get(r["peers"])
        ratio = f"{median / base:.2f}x" if base else "—"
        hub = max(r["hub_ratio"])
        lines.append(
            f"| {r['nodes']} | {'yes' if r['peers'] else 'no'} | {median:.2f} "
            f"({min(r['seconds']):.2f}–{max(r['seconds']):.2f}) | {ratio} | {hub:.3f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,4", help="fleet sizes (1,2,4)")
    parser.add_argument("--runs", type=int, default=1, help="runs per case (1)")
    parser.add_argument("--cap", default="25M", help="hub per-connection cap (25M bytes/s)")
    parser.add_argument("--modes", default="peers,hub", help="peers and/or hub (both)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--peer-upload-mbps", default=None, help="the nodes' upload budget (their default)"
    )
    args = parser.parse_args()
    gguf = assemble_gemma()
    load_before = os.getloadavg()
    results = []
    for mode in args.modes.split(","):
        for n in (int(x) for x in args.nodes.split(",")):
            runs = []
            for _ in range(args.runs):
                work = Path(tempfile.mkdtemp(prefix="llmlb-fleet-"))
                try:
                    runs.append(
                        one_case(work, gguf, n, mode == "peers", args.cap, args.peer_upload_mbps)
                    )
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                print(orjson.dumps(runs[-1]).decode(), flush=True)
            results.append(
                {
                    "nodes": n,
                    "peers": mode == "peers",
                    "seconds": [r["seconds"] for r in runs],
                    "hub_ratio": [r["hub_bytes"] / r["model_bytes"] for r in runs],
                    "runs": runs,
                }
            )
    table = render(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_before": load_before}
        out.write_bytes(
            orjson.dumps(
                {"results": results, "loadavg": os.getloadavg(), "meta": meta},
                option=orjson.OPT_INDENT_2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
