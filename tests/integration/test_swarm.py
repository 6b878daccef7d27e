"""Swarm distribution with real processes (router, hub stand-in behind a slow uplink, nodes):
pieces move between nodes while they download, before any of them is promoted; the peer
route serves a partial file's pieces only when they are held and verified, and only to the
fleet's token; nodes without an upload budget are never asked; a peer that never answers
costs no time-out."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import orjson
from llmlb.node.models.identity import FLEET_CREDENTIAL_FILENAME, fleet_credential
from llmlb.node.models.pieces import PIECE_SIZE, decode_bits

from tests.factories import write_safetensors_model
from tests.hub_fixtures import start_hub
from tests.node_fixtures import create_key, model_status, start_node
from tests.peer_fixtures import FakePeer
from tests.procs import LLMLB, wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-swarm-0123456789"
ROUTER_ENV = {"LLMLB_HEARTBEAT_INTERVAL_S": "0.3", "LLMLB_PEER_WAIT_S": "60"}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _write_model(directory: Path) -> dict[str, Path]:
    """A two-shard safetensors model of about 2 x 12 MiB; returns its shards by name."""
    write_safetensors_model(directory, shards=2, tensors_per_shard=2, shape=(1024, 1536))
    return {name: directory / name for name in SHARDS}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hub_bytes(log: Path) -> int:
    total = 0
    for line in log.read_text().splitlines():
        entry = orjson.loads(line)
        if "/resolve/" in entry["path"] and entry["path"].endswith(".safetensors"):
            total += entry["bytes"] or 0
    return total


def _state(node: str, model: str) -> str | None:
    return (model_status(node, model) or {}).get("state")


def _path(kind: str, model: str, filename: str) -> str:
    return f"/v0/peer/{kind}/{quote(model, safe='')}/{quote(filename)}"


def test_pieces_move_between_nodes_before_any_node_is_promoted(spawn, tmp_path):
    root = tmp_path / "hub"
    shards = _write_model(root / "st" / "model")
    size = sum(p.stat().st_size for p in shards.values())
    log = tmp_path / "hub.jsonl"
    # A slow uplink (8 MB/s for everyone): about 3 s for one copy, so pieces trade meanwhile.
    hub = start_hub(spawn, root, "--log-requests", str(log), "--total-bandwidth", "8M")
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub, **ROUTER_ENV})
    node_key = create_key(router, ADMIN, "node")
    nodes = [
        start_node(
            spawn, router, node_key, tmp_path / f"store{i}", "--store-all",
            env={"HF_ENDPOINT": hub},
        )  # fmt: skip
        for i in range(3)
    ]
    with FakePeer(router, node_key, {}, {}) as fake:  # a registered node gets the token
        token = fake.peer_token
    reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": "st/model"})
    assert reply.status == 201, reply.body

    def traded_before_promotion() -> dict | None:
        statuses = [model_status(node, "st/model") or {} for node in nodes]
        if any(s.get("state") == "ready" for s in statuses):
            raise AssertionError(f"a node was promoted before any piece moved: {statuses}")
        for status in statuses:
            sources = status.get("bytes_by_source") or {}
            if any(source != "hub" and n > 0 for source, n in sources.items()):
                return status
        return None

    wait_until(traded_before_promotion, timeout=60, interval=0.05, message="a piece from a peer")

    # While a node downloads, its map lists the pieces it holds with their hashes, and it
    # serves exactly those: a piece it holds (checked against the true bytes), not one it
    # lacks, and nothing without the fleet's token.
    def serves_only_held_pieces() -> bool:
        served = False
        for node in nodes:
            for name in SHARDS:
                true = shards[name].read_bytes()
                reply = call(node, "GET", _path("pieces", "st/model", name), token)
                if reply.status != 200 or reply.json["complete"]:
                    continue
                have = decode_bits(reply.json["have"], -(-len(true) // PIECE_SIZE))
                for index, held in enumerate(have):
                    start, end = index * PIECE_SIZE, min((index + 1) * PIECE_SIZE, len(true))
                    span = {"Range": f"bytes={start}-{end - 1}"}
                    got = call(node, "GET", _path("files", "st/model", name), token, headers=span)
                    if not held:
                        if got.status != 206:  # (206: the piece landed meanwhile)
                            assert got.status == 404, got.body
                            assert got.json["error"]["code"] == "piece_not_held"
                        continue
                    published = reply.json["hashes"][str(index)]
                    assert published == hashlib.sha256(true[start:end]).hexdigest()
                    assert got.status == 206 and got.body == true[start:end]
                    served = True
        return served

    wait_until(serves_only_held_pieces, timeout=60, interval=0.05, message="a partial's piece")
    for key in (None, node_key, token + "x"):
        assert call(nodes[0], "GET", _path("pieces", "st/model", SHARDS[0]), key).status == 401
        reply = call(nodes[0], "GET", _path("files", "st/model", SHARDS[0]), key)
        assert reply.status == 401 and reply.json["error"]["code"] == "invalid_api_key"
    bad_since = call(nodes[0], "GET", _path("pieces", "st/model", SHARDS[0]) + "?since=x", token)
    assert bad_since.status == 400 and bad_since.json["error"]["param"] == "since"
    for node in nodes:
        wait_until(lambda n=node: _state(n, "st/model") == "ready", timeout=120, message="ready")
        for name, path in shards.items():
            assert _sha(node.models_dir / "st" / "model" / name) == _sha(path)
    # Each byte came from the hub about once: well under the three copies of three nodes.
    assert _hub_bytes(log) < 2 * size
    # A ready node keeps serving: its map holds every piece, with the true hashes.
    true = shards[SHARDS[1]].read_bytes()
    count = -(-len(true) // PIECE_SIZE)
    for node in nodes:
        reply = call(node, "GET", _path("pieces", "st/model", SHARDS[1]), token)
        assert reply.status == 200 and reply.json["complete"], reply.body
        assert decode_bits(reply.json["have"], count) == [True] * count
        assert reply.json["hashes"]["0"] == hashlib.sha256(true[:PIECE_SIZE]).hexdigest()


def test_zero_budget_nodes_are_never_asked_and_a_silent_peer_costs_no_timeout(spawn, tmp_path):
    root = tmp_path / "hub"
    first = _write_model(root / "st" / "first")
    _write_model(root / "st" / "second")
    hub = start_hub(spawn, root, "--total-bandwidth", "40M")
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub, **ROUTER_ENV})
    node_key = create_key(router, ADMIN, "node")
    zero = start_node(
        spawn, router, node_key, tmp_path / "zero", "--store-all", "--peer-upload-mbps", "0",
        env={"HF_ENDPOINT": hub},
    )  # fmt: skip
    reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": "st/first"})
    assert reply.status == 201, reply.body
    wait_until(lambda: _state(zero, "st/first") == "ready", timeout=60, message="zero ready")
    second = call(router, "POST", "/v1/models/register", ADMIN, {"repo": "st/second"}).json
    revisions = {"st/first": reply.json["revision"], "st/second": second["revision"]}
    # A peer that accepts connections and never answers, listed as downloading both models.
    with FakePeer(router, node_key, {}, revisions, listen=False, hang=True,
                  state="downloading") as silent:  # fmt: skip
        other = start_node(
            spawn, router, node_key, tmp_path / "other", "--store-all",
            env={"HF_ENDPOINT": hub},
        )  # fmt: skip
        started = time.monotonic()
        for model, files in (("st/first", first), ("st/second", None)):
            # Well within one time-out (the node's 30 s): the silent peer's map is asked in
            # its own thread, and nothing is fetched from a peer whose map never came.
            wait_until(lambda m=model: _state(other, m) == "ready", timeout=25, message=model)
            for name, path in (files or {}).items():
                assert _sha(other.models_dir / "st" / "first" / name) == _sha(path)
        assert time.monotonic() - started < 30
        other_id = call(other, "GET", "/ready").json["node_id"]
        manifest = call(
            router, "GET", f"/v0/models/registry/st%2Ffirst/manifest.json?node_id={other_id}", ADMIN
        ).json
        zero_id = call(zero, "GET", "/ready").json["node_id"]
        assert zero_id not in [p["node_id"] for p in manifest.get("peers", [])]
        assert silent.node_id in [p["node_id"] for p in manifest.get("peers", [])]
    report = model_status(other, "st/first") or {}
    assert report.get("bytes_from_peers", 0) == 0 and report["bytes_from_hub"] > 0
    assert (model_status(zero, "st/first") or {}).get("serves_peers") is False
    metrics = call(zero, "GET", "/metrics").body.decode()
    assert 'llmlb_node_peer_refused_total{reason="disabled"}' not in metrics
    assert "llmlb_node_peer_served_bytes_total 0.0" in metrics


def test_llmlb_pull_on_a_node_machine_fetches_from_the_fleet(spawn, tmp_path):
    root = tmp_path / "hub"
    shards = _write_model(root / "st" / "model")
    size = sum(p.stat().st_size for p in shards.values())
    log = tmp_path / "hub.jsonl"
    hub = start_hub(spawn, root, "--log-requests", str(log))
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub, **ROUTER_ENV})
    node_key = create_key(router, ADMIN, "node")
    seed = start_node(
        spawn, router, node_key, tmp_path / "seed", "--store-all", env={"HF_ENDPOINT": hub}
    )
    assert call(router, "POST", "/v1/models/register", ADMIN, {"repo": "st/model"}).status == 201
    wait_until(lambda: _state(seed, "st/model") == "ready", timeout=120, message="seed ready")
    from_hub = _hub_bytes(log)
    assert from_hub >= size

    # A node machine: its node (which does not store safetensors models itself) was approved,
    # so the store holds the fleet's credential, and `llmlb pull` there fetches from the seed.
    machine = tmp_path / "machine"
    start_node(spawn, router, node_key, machine, env={"HF_ENDPOINT": hub})
    wait_until(lambda: fleet_credential(machine) is not None, timeout=30, message="credential")
    assert (machine / FLEET_CREDENTIAL_FILENAME).stat().st_mode & 0o777 == 0o600
    env = {"LLMLB_ROUTER_URL": router, "LLMLB_NODE_KEY": node_key, "HF_ENDPOINT": hub}
    pulled = _pull(machine, env)
    assert pulled.returncode == 0, pulled.stderr
    for name, path in shards.items():
        assert _sha(machine / "st" / "model" / name) == _sha(path)
    assert _hub_bytes(log) - from_hub < size // 4  # the bytes came from the seed

    # Elsewhere (no approved node in the store), the same pull goes to the hub.
    elsewhere = _pull(tmp_path / "elsewhere", env)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert _hub_bytes(log) - from_hub >= size


def _pull(store: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LLMLB, "pull", "st/model", "--models-dir", str(store)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=180, check=False,
    )  # fmt: skip
