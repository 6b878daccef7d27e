"""Starting nodes, routers and hub stand-ins for the benchmark, and reading what they report."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson

from bench.coldstart.common import (
    ADMIN_KEY,
    LLMLB,
    NODE_LAUNCH,
    REPO_ROOT,
    ProcTree,
    free_port,
    http_json,
    http_status,
    poll,
)
from tests.hub_fixtures import hub_argv
from tests.procs import Proc

_LOAD_SUM = re.compile(rb'^llmlb_node_model_load_seconds_sum\{kind="generate"\} (\S+)$', re.M)
_DOWNLOADED = re.compile(r"(\S+): downloaded in ([0-9.]+)s")
_READY_AFTER = re.compile(r"(\S+): ready ([0-9.]+)s after its last byte")
_LOADED = re.compile(r"(\S+): loaded in ([0-9.]+)s")
_HASH_TAIL = re.compile(r"(\S+): (\S+): ([0-9.]+) MiB in ([0-9.]+)s, hash tail ([0-9.]+)s")


class Node:
    """A running node: base URL, process, and the seconds from spawn to ``/ready``."""

    def __init__(self, url: str, proc: Proc, ready_s: float, health_s: float):
        self.url = url
        self.proc = proc
        self.ready_s = ready_s
        self.health_s = health_s

    def load_seconds(self) -> float:
        """Sum of the node's own ``model_load_seconds`` (prefetch + ``Llama(...)``)."""
        resp = _get_text(f"{self.url}/metrics")
        match = _LOAD_SUM.search(resp)
        return float(match.group(1)) if match else float("nan")

    def status(self) -> dict[str, Any]:
        """``GET /api/models/status``."""
        code, body = http_json(f"{self.url}/api/models/status", timeout=5)
        return body if code == 200 and isinstance(body, dict) else {}

    def downloaded_s(self, model_id: str) -> float:
        """The node's own "downloaded in" time for ``model_id`` (from its log)."""
        for mid, secs in _DOWNLOADED.findall(self.proc.log()):
            if mid == model_id:
                return float(secs)
        return float("nan")

    def ready_after_last_byte_s(self, model_id: str) -> float:
        """The node's own "ready Ns after its last byte" for ``model_id`` (from its log)."""
        return _last(_READY_AFTER.findall(self.proc.log()), model_id)

    def load_s(self, model_id: str) -> float:
        """The engine's own "loaded in" time of ``model_id``'s last load (from its log)."""
        return _last(_LOADED.findall(self.proc.log()), model_id)

    def hash_tails(self, model_id: str) -> list[tuple[str, float, float, float]]:
        """``(file, MiB, transfer s, hash tail s)`` per parallel-fetched file of ``model_id``."""
        return [
            (f, float(mib), float(t), float(tail))
            for mid, f, mib, t, tail in _HASH_TAIL.findall(self.proc.log())
            if mid == model_id
        ]


def _last(found: list[tuple[str, str]], model_id: str) -> float:
    values = [float(secs) for mid, secs in found if mid == model_id]
    return values[-1] if values else float("nan")


def _get_text(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read()


def start_node(
    tree: ProcTree,
    models_dir: Path,
    home: Path,
    *,
    router: str = "",
    api_key: str | None = None,
    prefetch: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    extra: tuple[str, ...] = (),
) -> Node:
    """Spawn ``llmlb node`` and wait for ``/ready``; times spawn → ``/health`` and ``/ready``."""
    port = free_port()
    argv = [
        *NODE_LAUNCH,
        *(() if prefetch else ("--no-prefetch",)),
        "node",
        "--router",
        router,
        "--models-dir",
        str(models_dir),
        "--port",
        str(port),
        "--max-loaded",
        "1",
        *extra,
    ]
    if api_key:
        argv += ["--api-key", api_key]
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    proc = tree.spawn(argv, env={"LLMLB_HOME": str(home), **(env or {})}, name="node")
    health_s = float("nan")

    def ready() -> bool:
        nonlocal health_s
        if not proc.alive():
            raise RuntimeError(f"node exited with {proc.popen.returncode}:\n{proc.log()}")
        code = http_status(f"{url}/ready", timeout=2)
        if code is not None and health_s != health_s:  # first answer of any kind
            health_s = time.monotonic() - started
        return code == 200

    try:
        poll(ready, timeout=timeout, message=f"{url}/ready")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n--- node log:\n{proc.log()[-4000:]}") from None
    return Node(url, proc, time.monotonic() - started, health_s)


def start_hub(tree: ProcTree, root: Path, bandwidth: str | None) -> str:
    """Spawn the hub stand-in (``--bandwidth`` when given); returns its base URL."""
    port = free_port()
    argv = hub_argv(port, root, *(("--bandwidth", bandwidth) if bandwidth else ()))
    proc = tree.spawn(argv, name="hub")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/health", timeout=60)
    return url


def start_router(tree: ProcTree, home: Path, hub_url: str) -> tuple[str, str]:
    """Spawn ``llmlb router`` against ``hub_url``; returns ``(url, node key)``."""
    port = free_port()
    argv = [*LLMLB, "router", "--host", "127.0.0.1", "--port", str(port)]
    env = {"LLMLB_HOME": str(home), "LLMLB_ADMIN_KEY": ADMIN_KEY, "HF_ENDPOINT": hub_url}
    env["LLMLB_NODE_APPROVAL"] = "auto"  # the bench's nodes serve at once
    proc = tree.spawn(argv, env=env, name="router")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/health", timeout=60)
    code, body = http_json(
        f"{url}/v0/keys", "POST", {"scope": "node", "name": "bench"}, key=ADMIN_KEY
    )
    if code != 201:
        raise RuntimeError(f"cannot create a node key: {code} {body}")
    return url, body["key"]


def run_json(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run a helper script in a fresh process; returns the JSON of its last stdout line."""
    import os

    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    done = subprocess.run(
        argv,
        capture_output=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(b"{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{argv} failed ({done.returncode}):\n{done.stderr.decode(errors='replace')[-3000:]}"
        )
    return orjson.loads(lines[-1])
