"""SIGKILL of ``llmlb node`` / ``llmlb router`` takes every process they started with it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.factories import gguf_bytes
from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, start_node
from tests.proc_tree import cmdline, descendants, gone, open_files, port_free
from tests.procs import Proc, wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-lifecycle"
# ~12 MiB, so the node fetches it with transfer workers (parallel ranges from 8 MiB); at
# 64 KB/s per connection a 1 MiB range takes 16 s, so a worker is mid-range (where it writes
# nothing to the node and would not notice its death) when the node is killed.
BIG = gguf_bytes(tensors=[("blk.0.weight", [3 << 20], "F32")])
TRANSFER_WORKER = "llmlb.node.models.download.workers"


def kill_main_and_check(proc: Proc, port: int) -> None:
    """SIGKILL ``proc`` alone: all its descendants are gone and its port is free (within
    10 s: they die at once, the bound only catches ones that never do)."""
    tree = descendants(proc.pid)
    assert tree, "the server runs its app in worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(timeout=5)
    left = wait_until(
        lambda: all(gone(pid) for pid in tree),
        timeout=10.0,
        interval=0.02,
        message=f"{[(pid, cmdline(pid)) for pid in tree if not gone(pid)]} to exit",
    )
    assert left
    wait_until(lambda: port_free(port), timeout=10.0, message=f"port {port} to be free")


def test_node_sigkill_takes_worker_and_transfer_workers(spawn, tmp_path: Path) -> None:
    root = tmp_path / "hub"
    make_repo(root, "org/big", {"big-F32.gguf": BIG})
    hub = start_hub(spawn, root, "--bandwidth", "64K")
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    key = create_key(router, ADMIN, "node")
    store = tmp_path / "store"
    # Hub only: a fleet node's swarm download runs in the node's own threads, not in a
    # transfer worker; this is about the workers hf_transfer runs in.
    node = start_node(spawn, router, key, store, "--no-peer-fetch", env={"HF_ENDPOINT": hub})
    assert call(router, "POST", "/v1/models/register", ADMIN, {"repo": "org/big"}).status == 201

    def busy_transfer_workers() -> list[int]:
        """Transfer workers with a staging file open: inside ``hf_transfer``, mid-range."""
        tree = descendants(node.proc.pid)
        workers = [pid for pid in tree if TRANSFER_WORKER in cmdline(pid)]
        return [pid for pid in workers if any(".staging" in f for f in open_files(pid))]

    wait_until(busy_transfer_workers, timeout=30, message="a transfer worker downloading")
    kill_main_and_check(node.proc, node.port)

    # The same port binds again, and only the new node answers on it.
    again = start_node(spawn, router, key, store, env={"HF_ENDPOINT": hub}, port=node.port)
    assert again.proc.alive()


def test_router_sigkill_takes_its_workers(spawn, tmp_path: Path) -> None:
    router = start_router(spawn, tmp_path / "home", ADMIN, "--workers", "2")
    port = int(router.rsplit(":", 1)[1])
    workers = descendants(router.proc.pid)
    assert len(workers) >= 2, workers
    kill_main_and_check(router.proc, port)
