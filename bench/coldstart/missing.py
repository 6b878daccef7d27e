"""Scenario 3: a missing model — the node downloads, verifies and loads it.

For each hub condition (capped per connection, uncapped) a hub stand-in, a router and a node
run together. Each run registers the repo at the router under a fresh model id and times,
from the register request until the node reports the model ``ready`` (and loaded, for a
GGUF), polling ``/api/models/status``; the node's own "downloaded in" log line gives the
download + verification part. The reference is ``bench/coldstart/baseline.py``
(``snapshot_download`` + the same load) in a fresh process against the same stand-in.

Also measured: the raw loopback copy rate (one plain ``curl`` GET of the GGUF to
``/dev/null``, uncapped stand-in), and, per condition, verification's share of a download:
the node's own ``ModelFetch`` run in this process with and without its streaming SHA-256
(the hasher replaced by a stub that reports the expected digest), with a breakdown of where
the time goes, plus one serial hash pass for scale.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.coldstart.common import (
    ADMIN_KEY,
    GEMMA_NAME,
    MIB,
    PY,
    ProcTree,
    gemma_path,
    http_json,
    poll,
    stats,
)
from bench.coldstart.nodes import Node, run_json, start_hub, start_node, start_router
from tests.factories import write_gguf, write_safetensors_model
from tests.hub_fixtures import make_repo

BASELINE = [PY, str(Path(__file__).with_name("baseline.py"))]
REPOS = {"gguf": "bench/gemma", "sharded": "bench/sharded"}
WARMUP_REPO = "bench/tiny"


def build_hub(root: Path, gen: Path, shards: int, shard_mib: int) -> dict[str, int]:
    """Repos on disk: the real Gemma GGUF and a generated sharded safetensors model."""
    make_repo(root, REPOS["gguf"], {GEMMA_NAME: gemma_path()})
    floats = shard_mib * MIB // 4 // 2  # two F32 tensors per shard
    write_safetensors_model(gen, shards=shards, tensors_per_shard=2, shape=(floats,))
    make_repo(root, REPOS["sharded"], {p.name: p for p in sorted(gen.iterdir())})
    tiny = write_gguf(gen.parent / "tiny-Q4_K_M.gguf")
    make_repo(root, WARMUP_REPO, {tiny.name: tiny})
    return {
        kind: sum(p.stat().st_size for p in (root / repo).iterdir()) for kind, repo in REPOS.items()
    }


def raw_copy(url: str) -> float:
    """Bytes/s of one plain HTTP GET of ``url`` written to ``/dev/null`` (curl)."""
    out = subprocess.run(
        ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        capture_output=True,
        check=True,
        timeout=300,
        text=True,
    ).stdout.split()
    return float(out[0]) / float(out[1])


def _wait_ready(
    node: Node, model_id: str, need_loaded: bool, started: float, timeout: float
) -> dict[str, float]:
    """Poll the node until ``model_id`` is ready; returns when each state was first seen."""
    seen: dict[str, float] = {}

    def ready() -> bool:
        for entry in node.status().get("models", []):
            if entry.get("id") != model_id:
                continue
            state = entry.get("state")
            seen.setdefault(state, time.monotonic() - started)
            if state == "failed":
                raise RuntimeError(f"{model_id} failed: {entry.get('error')}")
            return state == "ready" and (entry.get("loaded") or not need_loaded)
        return False

    poll(ready, timeout=timeout, interval=0.02, message=f"{model_id} ready")
    seen["done"] = time.monotonic() - started
    return seen


def _node_run(
    router: str,
    node: Node,
    models_dir: Path,
    repo: str,
    model_id: str,
    need_loaded: bool,
    timeout: float,
) -> dict[str, Any]:
    from llmlb.model_storage import normalize_model_id

    model_id = normalize_model_id(model_id)
    started = time.monotonic()
    code, body = http_json(
        f"{router}/v1/models/register", "POST", {"repo": repo, "id": model_id}, key=ADMIN_KEY
    )
    registered = time.monotonic() - started
    if code != 201:
        raise RuntimeError(f"register {model_id}: {code} {body}")
    seen = _wait_ready(node, model_id, need_loaded, started, timeout)
    result = {
        "ready_s": seen["done"],
        "register_s": registered,
        "downloaded_s": node.downloaded_s(model_id),
        "seen": seen,
        "hash_tails": node.hash_tails(model_id),
        "after_last_byte_s": node.ready_after_last_byte_s(model_id),
        "load_s": node.load_s(model_id) if need_loaded else float("nan"),
    }
    http_json(f"{router}/v1/models/{model_id}", "DELETE", key=ADMIN_KEY)
    try:  # the node removes what it downloaded; bounded wait, then clean up ourselves
        poll(lambda: not (models_dir / model_id).exists(), timeout=30, interval=0.05)
    except TimeoutError:
        shutil.rmtree(models_dir / model_id, ignore_errors=True)
    return result


def _baseline_run(hub: str, kind: str, cache: Path) -> dict[str, float]:
    try:
        return run_json(
            [
                *BASELINE,
                hub,
                REPOS[kind],
                str(cache),
                "--load",
                "gguf" if kind == "gguf" else "none",
            ],
            timeout=300,
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)


class _LogTimes(logging.Handler):
    """Collect the downloader's "MiB in Ts, hash tail Hs" lines."""

    pattern = re.compile(r"([0-9.]+) MiB in ([0-9.]+)s, hash tail ([0-9.]+)s")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if m := self.pattern.search(record.getMessage()):
            self.lines.append((float(m[1]), float(m[2]), float(m[3])))


@contextlib.contextmanager
def _phase_timers(dl: Any) -> Iterator[dict[str, float]]:
    """Time the downloader's phases by wrapping its functions (restored afterwards);
    ``dl`` is :mod:`llmlb.node.models.download.fetch`."""
    from llmlb.node.models.download import fetch_core as core

    phases: dict[str, float] = {}
    originals = {
        "probe": (core.Http, "probe"),  # measuring the node's own code
        "transfer": (core.TransferWorker, "run"),
        "promote": (dl, "promote"),  # the function ModelFetch calls
    }
    saved = {name: getattr(cls, attr) for name, (cls, attr) in originals.items()}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name == "transfer":  # also: call → first progress line (worker start-up)
                called, on_bytes = time.monotonic(), args[2]

                def first(n: int) -> None:
                    phases.setdefault("first_bytes", time.monotonic() - called)
                    on_bytes(n)

                args = (*args[:2], first, *args[3:])
            started = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.monotonic() - started

        return wrapper

    for name, (cls, attr) in originals.items():
        setattr(cls, attr, timed(name, saved[name]))
    try:
        yield phases
    finally:
        for name, (cls, attr) in originals.items():
            setattr(cls, attr, saved[name])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def verification_share(
    hub: str, work: Path, runs: int, kind: str = "gguf", hub_pid: int | None = None
) -> dict[str, Any]:
    """The node's ``ModelFetch`` with and without streaming SHA-256, alternating runs.

    Hashed runs also record where the time goes: ``probe`` (range probe), ``transfer`` (the
    transfer worker's job, ``first_bytes`` = until its first progress line), ``hash_tail``
    (hashing left after the last byte landed), ``promote`` (validation, rename, resolve).
    One untimed fetch first starts the shared transfer worker, as the node's warm-up does.
    Every run also records the CPU seconds spent by the hub stand-in (``hub_pid``), the
    transfer worker(s) and this process (the hasher thread runs here): on a 2-vCPU machine
    the download is CPU-bound, and hashing's CPU has to come from somewhere.
    """
    from llmlb.hub.repo import fetch_repo_manifest
    from llmlb.model_storage import ModelStorage
    from llmlb.node.models.download import fetch as dl
    from llmlb.node.models.download import fetch_core as core
    from llmlb.node.models.hashing import sha256_file
    from llmlb.protocol import Manifest

    repo_manifest = fetch_repo_manifest(REPOS[kind], endpoint=hub)
    expected = {f.filename: f.sha256 for f in repo_manifest.files}

    class NoHash:
        """Stands in for ``FollowingHasher``: reports the expected digest, reads nothing."""

        def __init__(self, path: Path, size: int, block: int = 0):
            self.digest = expected[Path(path).name.split(".part-")[0]]

        def start(self) -> None: ...
        def poke(self) -> None: ...
        def abort(self) -> None: ...
        def join(self) -> None: ...

        def finish(self) -> str:
            return self.digest

    handler = _LogTimes()
    log = logging.getLogger("llmlb.node.models.download.fetch")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    hashed, plain, phases_list, serial = [], [], [], []
    cpu: dict[str, list[dict[str, float]]] = {"with_hash": [], "without_hash": []}
    real = core.FollowingHasher
    pool = core.shared_pool()

    def cpu_now() -> dict[str, float]:
        return {
            "hub": _cpu_s(hub_pid) if hub_pid else 0.0,
            "worker": sum(_cpu_s(pid) for pid in pool.pids()),
            "node": time.process_time(),
        }

    try:
        for i in range(-1, runs):  # run -1: warm-up, not recorded
            for hashing in (True, False) if i >= 0 else (False,):
                store_dir = work / f"verify-{i}-{int(hashing)}"
                model_id = f"bench/verify-{i}"
                manifest = Manifest.from_dict({**repo_manifest.to_dict(), "model_id": model_id})
                core.FollowingHasher = real if hashing else NoHash
                fetch = dl.ModelFetch(
                    ModelStorage(store_dir), store_dir, manifest, allowed_hosts=["127.0.0.1"]
                )
                handler.lines.clear()
                with _phase_timers(dl) as phases:
                    cpu_before = cpu_now()
                    started = time.monotonic()
                    desc = fetch.run()
                    total = time.monotonic() - started
                    cpu_after = cpu_now()
                if i < 0:
                    shutil.rmtree(store_dir, ignore_errors=True)
                    continue
                used = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
                cpu["with_hash" if hashing else "without_hash"].append(used)
                if hashing:
                    hashed.append(total)
                    phases["hash_tail"] = sum(t for _, _, t in handler.lines)
                    phases["total"] = total
                    phases_list.append(phases)
                    serial_started = time.monotonic()
                    sha256_file(Path(desc.primary_path))
                    serial.append(time.monotonic() - serial_started)
                else:
                    plain.append(total)
                shutil.rmtree(store_dir, ignore_errors=True)
    finally:
        core.FollowingHasher = real
        log.removeHandler(handler)
    with_hash, without = stats(hashed), stats(plain)
    names = sorted({k for p in phases_list for k in p})
    return {
        "with_hash": with_hash.to_dict(),
        "without_hash": without.to_dict(),
        "phases": {k: stats([p.get(k, 0.0) for p in phases_list]).to_dict() for k in names},
        "serial_sha256": stats(serial).to_dict(),
        "added": with_hash.median / without.median - 1,
        "cpu": {
            mode: {
                part: stats([r[part] for r in rows]).to_dict() for part in ("hub", "worker", "node")
            }
            | {"total": stats([sum(r.values()) for r in rows]).to_dict()}
            for mode, rows in cpu.items()
        },
    }


def missing_model(
    work: Path,
    runs: int,
    caps: list[str | None],
    kinds: list[str],
    shards: int = 8,
    shard_mib: int = 32,
    timeout: float = 180.0,
    verify: bool = True,
) -> dict[str, Any]:
    """Scenario 3 for every hub condition in ``caps`` (``None`` = uncapped)."""

    sizes = build_hub(work / "hub", work / "gen" / "sharded", shards, shard_mib)
    out: dict[str, Any] = {"sizes": sizes, "shards": shards, "conditions": {}}
    for cap in caps:
        name = f"cap_{cap}".lower() if cap else "uncapped"
        cond: dict[str, Any] = {"bandwidth": cap}
        with ProcTree(work / "logs" / name) as tree:
            hub = start_hub(tree, work / "hub", cap)
            hub_pid = tree.procs[-1].pid
            from llmlb.hub.repo import fetch_repo_manifest

            for repo in REPOS.values():  # the stand-in hashes new files once, here
                fetch_repo_manifest(repo, endpoint=hub)
            router, key = start_router(tree, work / f"router-{name}", hub)
            models_dir = work / f"store-{name}"
            node = start_node(
                tree,
                models_dir,
                work / "node-home",
                router=router,
                api_key=key,
                env={"HF_ENDPOINT": hub},
                extra=("--store-all",),  # the safetensors model too (no runtime serves it)
            )
            if cap is None:  # capped, one GET runs at the cap by construction
                gguf_url = f"{hub}/{REPOS['gguf']}/resolve/main/{GEMMA_NAME}"
                cond["raw_copy_Bps"] = stats(
                    [raw_copy(gguf_url) for _ in range(runs)], "B/s"
                ).to_dict()
            # warm-up: the router's first hub lookup and the node's first download path
            _node_run(router, node, models_dir, WARMUP_REPO, f"bench/warmup-{name}", False, timeout)
            for kind in kinds:
                node_runs, base_runs = [], []
                for i in range(runs):
                    node_runs.append(
                        _node_run(
                            router,
                            node,
                            models_dir,
                            REPOS[kind],
                            f"bench/{kind}-{name}-r{i}",
                            kind == "gguf",
                            timeout,
                        )
                    )
                    base_runs.append(_baseline_run(hub, kind, work / "hf-cache" / f"{i}"))
                raw = cond["raw_copy_Bps"]["median"] if cap is None else float("nan")
                cond[kind] = _summarise(node_runs, base_runs, sizes[kind], raw)
            if verify:
                cond["verification"] = verification_share(hub, work, runs, hub_pid=hub_pid)
        out["conditions"][name] = cond
    return out


def _summarise(
    node_runs: list[dict], base_runs: list[dict], size: int, raw_bps: float
) -> dict[str, Any]:
    ready = stats([r["ready_s"] for r in node_runs])
    downloaded = stats([r["downloaded_s"] for r in node_runs])
    base = stats([r["total_s"] for r in base_runs])
    return {
        "node_ready": ready.to_dict(),
        "node_download": downloaded.to_dict(),
        "node_register": stats([r["register_s"] for r in node_runs]).to_dict(),
        "node_states_seen": [r["seen"] for r in node_runs],
        "node_hash_tails": [r["hash_tails"] for r in node_runs],
        "baseline_total": base.to_dict(),
        "baseline_download": stats([r["download_s"] for r in base_runs]).to_dict(),
        "baseline_load": stats([r["load_s"] for r in base_runs]).to_dict(),
        "speedup": base.median / ready.median,
        "after_last_byte": stats([r["after_last_byte_s"] for r in node_runs]).to_dict(),
        "node_load": stats([r["load_s"] for r in node_runs]).to_dict(),
        # per run: last byte → ready beyond the load itself (the overlap's leftover)
        "beyond_load": stats(
            [r["after_last_byte_s"] - r["load_s"] for r in node_runs]
        ).to_dict(),
        "raw_copy_s": size / raw_bps,
        "download_vs_raw": downloaded.median / (size / raw_bps),
    }
