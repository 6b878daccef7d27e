"""Model ids that would nest in the store (``nest`` and ``nest/inner``) are refused everywhere.

Real hub stand-in, router and node: the router answers 409 ``model_id_conflict`` at
registration, ids naming the store's dot-directories are 400, and a node whose store already
holds a model around (or inside) a registered id refuses to promote it rather than nesting
one model in another or deleting either's files.
"""

from __future__ import annotations

from tests.factories import gguf_bytes
from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, model_status, start_node
from tests.procs import wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-model-id-conflicts"
TINY = gguf_bytes()


def _register(router: str, repo: str, model_id: str):
    return call(router, "POST", "/v1/models/register", ADMIN, {"repo": repo, "id": model_id})


def _failed(node: str, model_id: str) -> dict | None:
    entry = model_status(node, model_id) or {}
    return entry if entry.get("state") == "failed" else None


def test_nesting_ids_are_refused_by_router_and_store(spawn, tmp_path):
    root = tmp_path / "hub"
    for repo in ("acme/outer", "acme/inner"):
        make_repo(root, repo, {"model.gguf": TINY})
    hub = start_hub(spawn, root)
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})

    # The router: a path prefix either way is 409; a dot segment is no id at all.
    assert _register(router, "acme/outer", "team/nest").status == 201
    for model_id in ("team/nest/inner", "team/nest/a/b:q4_k_m", "team"):
        reply = _register(router, "acme/inner", model_id)
        assert reply.status == 409, reply.body
        assert reply.json["error"]["code"] == "model_id_conflict"
        assert "team/nest" in reply.json["error"]["message"]
    for model_id in (".staging/team/nest", "team/.locks"):
        reply = _register(router, "acme/inner", model_id)
        assert reply.status == 400 and reply.json["error"]["code"] == "invalid_model_id"
    assert [m["id"] for m in call(router, "GET", "/v0/models", ADMIN).json["models"]] == [
        "team/nest"
    ]

    # The store: a model placed by hand around a registered id, and one placed inside another.
    store = tmp_path / "store"
    (store / "hand" / "outer").mkdir(parents=True)
    (store / "hand" / "outer" / "model.gguf").write_bytes(TINY)
    (store / "team" / "nest" / "placed").mkdir(parents=True)
    (store / "team" / "nest" / "placed" / "model.gguf").write_bytes(TINY)
    assert _register(router, "acme/inner", "hand/outer/inner").status == 201
    node = start_node(
        spawn, router, create_key(router, ADMIN, "node"), store, env={"HF_ENDPOINT": hub}
    )
    inner = wait_until(lambda: _failed(node, "hand/outer/inner"), timeout=60, message="refused")
    assert "model id conflict" in inner["error"] and "hand/outer" in inner["error"]
    nest = wait_until(lambda: _failed(node, "team/nest"), timeout=60, message="refused")
    assert "conflict" in nest["error"] and "team/nest/placed" in nest["error"]
    assert (model_status(node, "hand/outer") or {}).get("state") == "ready"
    assert not (store / "hand" / "outer" / "inner").exists()  # nothing promoted inside it

    # Deleting the registered model never touches the hand-placed one inside its directory.
    assert call(router, "DELETE", "/v1/models/team/nest", ADMIN).status == 204
    wait_until(lambda: model_status(node, "team/nest") is None, timeout=30, message="forgotten")
    assert (store / "team" / "nest" / "placed" / "model.gguf").read_bytes() == TINY
    assert (store / "hand" / "outer" / "model.gguf").read_bytes() == TINY
