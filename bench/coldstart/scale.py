"""Scenario 4: node start-up with many (tiny, generated) models in the store.

Times a fresh ``llmlb node`` from spawn until ``GET /ready`` answers 200, serving local models
only (``--router ''``) and registered with a real router (the registration then reports every
model). For scale: spawn → first HTTP answer (interpreter, imports, Granian), spawn →
``/ready`` with an empty store, and one in-process ``ModelStorage.list_available()`` over the
same store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.coldstart.common import ProcTree, stats
from bench.coldstart.nodes import start_hub, start_node, start_router
from tests.factories import write_gguf_model


def build_store(models_dir: Path, count: int) -> list[str]:
    """``count`` tiny valid GGUF models ``bench/tiny-NNNN``."""
    ids = [f"bench/tiny-{i:04d}" for i in range(count)]
    for model_id in ids:
        write_gguf_model(models_dir, model_id)
    return ids


def many_models(
    work: Path, runs: int, count: int = 1000, with_router: bool = True
) -> dict[str, Any]:
    """Scenario 4: spawn → ``/ready`` with ``count`` models in the store."""
    from llmlb.model_storage import ModelStorage

    models_dir = work / "models"
    build_store(models_dir, count)
    listing = []
    for _ in range(runs):
        started = time.monotonic()
        found = ModelStorage(models_dir).list_available()
        listing.append(time.monotonic() - started)
    if len(found) != count:
        raise RuntimeError(f"the store lists {len(found)} of {count} models")
    local, local_health, routed, routed_health, empty = [], [], [], [], []
    with ProcTree(work / "logs") as tree:
        for _ in range(runs):
            node = start_node(tree, models_dir, work / "home")
            local.append(node.ready_s)
            local_health.append(node.health_s)
            tree.stop(node.proc)
            node = start_node(tree, work / "empty", work / "home-empty")
            empty.append(node.ready_s)
            tree.stop(node.proc)
        if with_router:
            (work / "hub").mkdir(exist_ok=True)
            hub = start_hub(tree, work / "hub", None)
            router, key = start_router(tree, work / "router", hub)
            for _ in range(runs):
                node = start_node(
                    tree,
                    models_dir,
                    work / "home",
                    router=router,
                    api_key=key,
                    env={"HF_ENDPOINT": hub},
                )
                routed.append(node.ready_s)
                routed_health.append(node.health_s)
                tree.stop(node.proc)
    out = {
        "models": count,
        "ready_local": stats(local).to_dict(),
        "first_answer_local": stats(local_health).to_dict(),
        "list_available": stats(listing).to_dict(),
        "ready_empty": stats(empty).to_dict(),
    }
    if with_router:
        out["ready_with_router"] = stats(routed).to_dict()
        out["first_answer_with_router"] = stats(routed_health).to_dict()
    return out
