"""Scenarios 1 and 2: first token from a model already in the store, warm and cold page cache.

Each run starts a fresh node (``--router ''``, local models only), waits for ``/ready``, then
times one streamed ``/v1/completions`` request (one token) from the moment it is sent until
the first token event arrives; the node loads the model on that first request; the CPU time
of the node's process group over that request is recorded too. The floor is
``bench/coldstart/floor.py`` in a fresh process, and llama.cpp's ``llama-server`` from
process start to the first token with the node's slots and context
(``bench/coldstart/server_floor.py``). Node and floor runs alternate so that load on the
machine hits both alike.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from bench.coldstart.common import (
    GEMMA_NAME,
    PY,
    ProcTree,
    evict,
    first_token,
    gemma_path,
    group_cpu_seconds,
    resident_fraction,
    stats,
    warm,
)
from bench.coldstart.nodes import run_json, start_node
from bench.coldstart.server_floor import server_binary, server_first_token

MODEL_ID = "bench/gemma"
FLOOR = [PY, str(Path(__file__).with_name("floor.py"))]


def _store(work: Path) -> tuple[Path, Path]:
    """A store holding a private copy of the GGUF (a hard link would share the page cache
    with anything else that maps the cached file, and mapped pages cannot be evicted)."""
    models = work / "models"
    gguf = models / MODEL_ID / GEMMA_NAME
    gguf.parent.mkdir(parents=True)
    shutil.copyfile(gemma_path(), gguf)
    return models, gguf


def _node_first_token(
    tree: ProcTree, models: Path, home: Path, gguf: Path, *, cold: bool, prefetch: bool
) -> dict[str, float]:
    node = start_node(tree, models, home, prefetch=prefetch)
    try:
        if cold:
            evict([gguf])
        resident = resident_fraction(gguf)
        cpu_before = group_cpu_seconds(node.proc.pid)
        seconds, status = first_token(node.url, MODEL_ID)
        cpu = group_cpu_seconds(node.proc.pid) - cpu_before
        if status != 200 or math.isnan(seconds):
            raise RuntimeError(f"first request answered {status}:\n{node.proc.log()[-3000:]}")
        return {
            "ttft_s": seconds,
            "load_s": node.load_seconds(),
            "resident": resident,
            "ready_s": node.ready_s,
            "cpu_s": cpu,
        }
    finally:
        tree.stop(node.proc)


def _floor(gguf: Path, *args: str) -> dict[str, float]:
    return run_json([*FLOOR, str(gguf), *args], timeout=180)


def warm_store(work: Path, runs: int) -> dict[str, Any]:
    """Scenario 1: page cache warm."""
    models, gguf = _store(work)
    binary = server_binary()
    node, floor, floor_ctx, server, server_nw = [], [], [], [], []
    with ProcTree(work / "logs") as tree:
        for _ in range(runs):
            warm([gguf])
            node.append(
                _node_first_token(tree, models, work / "home", gguf, cold=False, prefetch=True)
            )
            warm([gguf])
            server.append(server_first_token(binary, gguf, work / "logs" / "llama-server.log"))
            server_nw.append(
                server_first_token(
                    binary, gguf, work / "logs" / "llama-server.log", warmup=False
                )
            )
            floor.append(_floor(gguf))
            floor_ctx.append(_floor(gguf, "--n-ctx", "4096"))
    node_ttft = stats([r["ttft_s"] for r in node])
    floor_total = stats([r["total_s"] for r in floor])
    return {
        "node_ttft": node_ttft.to_dict(),
        "node_load": stats([r["load_s"] for r in node]).to_dict(),
        "floor": floor_total.to_dict(),
        "floor_load": stats([r["load_s"] for r in floor]).to_dict(),
        "floor_n_ctx_4096": stats([r["total_s"] for r in floor_ctx]).to_dict(),
        "overhead": node_ttft.median / floor_total.median - 1,
        "overhead_best": node_ttft.min / floor_total.min - 1,
        "overhead_best_vs_n_ctx_4096": node_ttft.min / stats([r["total_s"] for r in floor_ctx]).min
        - 1,
        "overhead_vs_n_ctx_4096": node_ttft.median / stats([r["total_s"] for r in floor_ctx]).median
        - 1,
        "resident_before": [r["resident"] for r in node],
        "node_cpu": stats([r["cpu_s"] for r in node]).to_dict(),
        "floor_cpu": stats([r["cpu_s"] for r in floor]).to_dict(),
        "floor_n_ctx_4096_cpu": stats([r["cpu_s"] for r in floor_ctx]).to_dict(),
        **_server_results(node_ttft, server, server_nw),
    }


def _server_results(node_ttft: Any, server: list[dict], server_nw: list[dict]) -> dict[str, Any]:
    """llama-server's start → first token (with and without its warm-up) and the node's
    ratio to the faster of the two."""
    with_warmup = stats([r["total_s"] for r in server])
    no_warmup = stats([r["total_s"] for r in server_nw])
    best = min(with_warmup.median, no_warmup.median)
    return {
        "server": with_warmup.to_dict(),
        "server_no_warmup": no_warmup.to_dict(),
        "vs_server": node_ttft.median / best,
    }


def cold_cache(work: Path, runs: int) -> dict[str, Any]:
    """Scenario 2: model files evicted from the page cache, with and without prefetch."""
    models, gguf = _store(work)
    binary = server_binary()
    with_pf, without_pf, floor, floor_pf, server, server_nw = [], [], [], [], [], []
    with ProcTree(work / "logs") as tree:
        for _ in range(runs):
            evict([gguf])
            server.append(server_first_token(binary, gguf, work / "logs" / "llama-server.log"))
            evict([gguf])
            server_nw.append(
                server_first_token(
                    binary, gguf, work / "logs" / "llama-server.log", warmup=False
                )
            )
            with_pf.append(
                _node_first_token(tree, models, work / "home", gguf, cold=True, prefetch=True)
            )
            without_pf.append(
                _node_first_token(tree, models, work / "home", gguf, cold=True, prefetch=False)
            )
            floor.append(_floor(gguf, "--evict"))
            floor_pf.append(_floor(gguf, "--evict", "--prefetch"))
    result: dict[str, Any] = {
        "node_prefetch_ttft": stats([r["ttft_s"] for r in with_pf]).to_dict(),
        "node_no_prefetch_ttft": stats([r["ttft_s"] for r in without_pf]).to_dict(),
        "node_prefetch_load": stats([r["load_s"] for r in with_pf]).to_dict(),
        "node_no_prefetch_load": stats([r["load_s"] for r in without_pf]).to_dict(),
        "floor": stats([r["total_s"] for r in floor]).to_dict(),
        "floor_prefetch": stats([r["total_s"] for r in floor_pf]).to_dict(),
        "resident_after_evict": stats(
            [r["resident"] for r in [*with_pf, *without_pf, *floor, *floor_pf]], "share"
        ).to_dict(),
        "node_prefetch_cpu": stats([r["cpu_s"] for r in with_pf]).to_dict(),
        "floor_cpu": stats([r["cpu_s"] for r in floor]).to_dict(),
    }
    result["overhead"] = result["node_prefetch_ttft"]["median"] / result["floor"]["median"] - 1
    result.update(
        _server_results(stats([r["ttft_s"] for r in with_pf]), server, server_nw)
    )
    return result
