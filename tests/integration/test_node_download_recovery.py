"""Failed downloads recover on their own, the allowlist holds against redirects, and a node
downloads and lists only what its runtimes serve (real router, nodes and hub stand-ins)."""

from __future__ import annotations

import time

import orjson

from tests.factories import gguf_bytes, write_safetensors_model
from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, model_status, start_node
from tests.procs import wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-download-recovery"
TINY = gguf_bytes()
# ~12 MiB: fetched with parallel range requests by hf_transfer (>= 8 MiB).
BIG = gguf_bytes(tensors=[("blk.0.weight", [3 << 20], "F32")])


def _fleet(spawn, tmp_path, hub, *node_args: str):
    """A router and one node on ``hub``; returns ``(router, node)``."""
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    key = create_key(router, ADMIN, "node")
    node = start_node(spawn, router, key, tmp_path / "store", *node_args, env={"HF_ENDPOINT": hub})
    return router, node


def _register(router, repo: str) -> None:
    reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": repo})
    assert reply.status == 201, reply.body


def _router_report(router, model_id: str) -> dict:
    for node in call(router, "GET", "/v0/nodes", ADMIN).json["nodes"]:
        for report in node["models"]:
            if report["id"] == model_id:
                return report
    return {}


def _log(path):
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def test_hub_outage_is_retried_with_backoff_until_the_model_is_ready(spawn, tmp_path):
    model = "outage/tiny"
    make_repo(tmp_path / "hub", model, {"model.gguf": TINY})
    # The hub answers 503 to the first 6 GETs of the file: more than one round of attempts.
    hub = start_hub(spawn, tmp_path / "hub", "--fault", "fail-first:n=6,file=*.gguf")
    router, node = _fleet(spawn, tmp_path, hub)
    _register(router, model)

    failed = wait_until(
        lambda: (r := model_status(node, model) or {}).get("state") == "failed" and r,
        timeout=30,
        message="first round of attempts failed",
    )
    assert "503" in failed["error"] and failed["attempts"] >= 1
    assert time.time() - 5 < failed["retry_at"] < time.time() + 700
    seen = wait_until(
        lambda: (r := _router_report(router, model)).get("state") == "failed" and r,
        timeout=15,
        message="the failure in /v0/nodes",
    )
    assert "503" in seen["error"] and seen["attempts"] >= 1 and seen["retry_at"] > 0

    # No restart, no re-registration: the node's own retry gets it once the hub recovers.
    wait_until(lambda: (model_status(node, model) or {}).get("state") == "ready", timeout=30)
    assert "attempts" not in model_status(node, model)
    listed = {m["id"] for m in call(node, "GET", "/v1/models").json["data"]}
    assert model in listed


def test_admin_retry_route_retries_at_once(spawn, tmp_path):
    model = "flaky/tiny"
    hub_root = tmp_path / "hub"
    make_repo(hub_root, model, {"model.gguf": TINY})
    hub = start_hub(spawn, hub_root)
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    _register(router, model)
    # The hub now serves other bytes (same size): every try fails its sha256 check.
    make_repo(hub_root, model, {"model.gguf": TINY[:-8] + b"\xff" * 8})
    key = create_key(router, ADMIN, "node")
    node = start_node(spawn, router, key, tmp_path / "store", env={"HF_ENDPOINT": hub})
    wait_until(
        lambda: (
            (model_status(node, model) or {}).get("attempts", 0) >= 3
            and model_status(node, model)["state"] == "failed"
        ),
        timeout=30,
        message="three failed tries",
    )
    report = model_status(node, model)
    assert "sha256" in report["error"]
    assert report["retry_at"] - time.time() > 2  # the backoff has grown

    reply = call(router, "POST", "/v0/models/no/such/retry", ADMIN)
    assert reply.status == 404 and reply.json["error"]["code"] == "model_not_found"
    api_key = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api"}).json["key"]
    assert call(router, "POST", f"/v0/models/{model}/retry", api_key).status == 403

    make_repo(hub_root, model, {"model.gguf": TINY})  # fixed on the hub
    reply = call(router, "POST", f"/v0/models/{model}/retry", ADMIN)
    assert reply.status == 202 and reply.json["nodes"], reply.body
    wait_until(lambda: (model_status(node, model) or {}).get("state") == "ready", timeout=10)
    assert time.time() < report["retry_at"], "ready only through the backoff, not the retry"


def test_redirects_off_the_allowlist_are_refused(spawn, tmp_path):
    model = "redirect/big"
    root = tmp_path / "hub"
    make_repo(root, model, {"model.gguf": BIG})
    other_log, hub_log = tmp_path / "other.jsonl", tmp_path / "hub.jsonl"
    other = start_hub(spawn, root, "--log-requests", str(other_log))
    # 'localhost' is the same machine but not on the node's allowlist (HF_ENDPOINT's 127.0.0.1).
    elsewhere = other.replace("127.0.0.1", "localhost")
    hub = start_hub(
        spawn,
        root,
        "--log-requests",
        str(hub_log),
        "--fault",
        f"redirect-ranges:{elsewhere}",
    )
    router, node = _fleet(spawn, tmp_path, hub)
    _register(router, model)

    report = wait_until(
        lambda: (r := model_status(node, model) or {}).get("state") == "failed" and r,
        timeout=60,
        message="the download refused",
    )
    assert "not on the download allowlist" in report["error"] and "localhost" in report["error"]
    assert any("redirect-ranges" in r["faults"] for r in _log(hub_log)), "never redirected"
    served = [r for r in _log(other_log) if "/resolve/" in r["path"]]
    assert sum(r["bytes"] for r in served) == 0 and served == []
    assert not (tmp_path / "store" / "redirect" / "big").exists()


def test_nodes_download_and_list_only_what_their_runtime_serves(spawn, tmp_path):
    root = tmp_path / "hub"
    write_safetensors_model(root / "st" / "model")
    make_repo(root, "gg/tiny", {"model.gguf": TINY})
    hub = start_hub(spawn, root)
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    key = create_key(router, ADMIN, "node")
    plain = start_node(spawn, router, key, tmp_path / "plain", env={"HF_ENDPOINT": hub})
    keeper = start_node(
        spawn, router, key, tmp_path / "keeper", "--store-all", env={"HF_ENDPOINT": hub}
    )
    _register(router, "st/model")
    _register(router, "gg/tiny")

    for node in (plain, keeper):
        wait_until(lambda n=node: (model_status(n, "gg/tiny") or {}).get("state") == "ready")
    assert model_status(plain, "gg/tiny")["servable"] is True
    skipped = wait_until(
        lambda: (r := model_status(plain, "st/model") or {}).get("state") == "failed" and r,
        message="safetensors model skipped",
    )
    assert skipped["servable"] is False
    assert skipped["error"] == "no runtime of this node serves safetensors"
    assert "retry_at" not in skipped  # not a failure to retry
    assert not (tmp_path / "plain" / "st" / "model").exists()
    stored = wait_until(
        lambda: (r := model_status(keeper, "st/model") or {}).get("state") == "ready" and r,
        message="safetensors model stored by the --store-all node",
    )
    assert stored["servable"] is False and stored["format"] == "safetensors"
    assert (tmp_path / "keeper" / "st" / "model" / "model.safetensors").exists()

    for node in (plain, keeper):
        listed = [m["id"] for m in call(node, "GET", "/v1/models").json["data"]]
        assert listed == ["gg/tiny"]
        reply = call(node, "POST", "/v1/completions", body={"model": "st/model", "prompt": "x"})
        assert reply.status == 400, reply.body
        error = reply.json["error"]
        assert error["code"] == "model_not_servable" and "safetensors" in error["message"]
    nodes = call(router, "GET", "/v0/nodes", ADMIN).json["nodes"]
    assert [n["runtimes"] for n in nodes] == [["llama.cpp"], ["llama.cpp"]]
    reports = {(n["url"], m["id"]): m for n in nodes for m in n["models"]}
    assert reports[(keeper, "st/model")]["servable"] is False
    assert reports[(plain, "gg/tiny")]["servable"] is True
