"""The downloader against a real hub stand-in: allowlist, token, resume, disk space."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from pathlib import Path

import orjson
import pytest
from llmlb.errors import (
    DownloadCancelled,
    DownloadError,
    HostNotAllowed,
    InsufficientDiskSpace,
    IntegrityCheckFailed,
)
from llmlb.model_storage import ModelStorage, staging_dir
from llmlb.node.models.download.allowlist import host_allowed, no_proxy_entries
from llmlb.node.models.download.fetch import ModelFetch
from llmlb.node.models.download.http import Http
from llmlb.node.models.download.options import PARALLEL_MIN_BYTES, DownloadOptions, DownloadProgress
from llmlb.node.models.download.staging import VERIFIED_FILENAME, was_downloaded
from llmlb.node.models.download.workers import TransferPool, shared_pool
from llmlb.node.models.hashing import FollowingHasher
from llmlb.protocol import Manifest, ManifestFile

from tests.factories import gguf_bytes, split_name, write_safetensors_model
from tests.hub_fixtures import make_repo, start_hub
from tests.procs import wait_until

A = gguf_bytes(name="a", split=(1, 2), split_tensors_count=4)
B = gguf_bytes(name="b", split=(2, 2), split_tensors_count=4)
NAME_A, NAME_B = split_name("model", 1, 2), split_name("model", 2, 2)
FILES = {NAME_A: A, NAME_B: B}


def _manifest(base: str, files: dict[str, bytes], model_id: str = "org/split") -> Manifest:
    specs = tuple(
        ManifestFile(
            name,
            len(data),
            hashlib.sha256(data).hexdigest(),
            f"{base}/org/split/resolve/main/{name}",
            priority=i,
        )
        for i, (name, data) in enumerate(files.items())
    )
    return Manifest(model_id, specs)


def _log(path) -> list[dict]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        ("https://huggingface.co/x", ["huggingface.co"], True),
        ("https://cdn-lfs.hf.co/x", ["*.hf.co"], True),
        ("https://hf.co.evil.example/x", ["*.hf.co"], False),
        ("https://evilhuggingface.co/x", ["*.huggingface.co", "huggingface.co"], False),
        ("ftp://huggingface.co/x", ["huggingface.co"], False),
        ("http://127.0.0.1:9/x", ["127.0.0.1"], True),
    ],
)
def test_host_allowlist(url, allowed, ok):
    assert host_allowed(url, allowed) is ok


def test_off_allowlist_url_is_refused_and_the_token_never_sent(spawn, tmp_path):
    root = tmp_path / "hub"
    files = FILES
    make_repo(root, "org/split", files)
    log = tmp_path / "hub.jsonl"
    hub = start_hub(spawn, root, "--log-requests", str(log))
    other_host = hub.replace("127.0.0.1", "localhost")
    store = tmp_path / "store"
    store.mkdir()
    fetch = ModelFetch(
        ModelStorage(store),
        store,
        _manifest(other_host, files),
        allowed_hosts=["127.0.0.1"],
        token="hf_secret",
    )
    with pytest.raises(HostNotAllowed, match="localhost"):
        fetch.run()
    assert not [r for r in _log(log) if "/resolve/" in r["path"]]
    assert ModelStorage(store).list_available() == []


def test_allowlist_as_no_proxy_and_refused_urls():
    assert no_proxy_entries(["127.0.0.1", "*.hf.co", "HuggingFace.co.", "*.hf.co"]) == (
        "127.0.0.1,.hf.co,huggingface.co"
    )
    http = Http(["127.0.0.1"], None, 1.0)
    message = "Error while downloading: error sending request for url (http://localhost:9/f)"
    assert http.refused(message) == "http://localhost:9/f"
    assert http.refused(message.replace("localhost", "127.0.0.1")) is None  # hub down
    assert http.refused("Failed after too many retries") is None


def test_a_redirect_during_the_transfer_is_refused(spawn, tmp_path):
    big = gguf_bytes(tensors=[("blk.0.weight", [3 << 20], "F32")])  # parallel ranges
    root = tmp_path / "hub"
    make_repo(root, "org/split", {"big.gguf": big})
    other_log = tmp_path / "other.jsonl"
    other = start_hub(spawn, root, "--log-requests", str(other_log))
    redirect = f"redirect-ranges:{other.replace('127.0.0.1', 'localhost')}"
    hub = start_hub(spawn, root, "--fault", redirect)
    store = tmp_path / "store"
    store.mkdir()
    fetch = ModelFetch(
        ModelStorage(store), store, _manifest(hub, {"big.gguf": big}), allowed_hosts=["127.0.0.1"]
    )
    with pytest.raises(HostNotAllowed, match="redirected the transfer to http://localhost"):
        fetch.run()
    assert not [r for r in _log(other_log) if "/resolve/" in r["path"]]
    assert ModelStorage(store).list_available() == []


def test_verified_files_are_not_fetched_again_after_a_failure(spawn, tmp_path):
    root = tmp_path / "hub"
    files = FILES
    make_repo(root, "org/split", files)
    store = tmp_path / "store"
    store.mkdir()
    log1 = tmp_path / "hub1.jsonl"
    broken = start_hub(
        spawn,
        root,
        "--log-requests",
        str(log1),
        "--fault",
        f"status:file={NAME_B},code=404,times=always",
    )
    options = DownloadOptions(max_attempts=1)
    with pytest.raises(DownloadError, match="404"):
        ModelFetch(
            ModelStorage(store),
            store,
            _manifest(broken, files),
            allowed_hosts=["127.0.0.1"],
            options=options,
        ).run()
    assert "org/split" not in ModelStorage(store).list_available()
    assert (staging_dir(store, "org/split") / "files" / NAME_A).is_file()

    log2 = tmp_path / "hub2.jsonl"
    healthy = start_hub(spawn, root, "--log-requests", str(log2))
    seen = []
    desc = ModelFetch(
        ModelStorage(store),
        store,
        _manifest(healthy, files),
        allowed_hosts=["127.0.0.1"],
        progress=seen.append,
    ).run()
    assert desc.id == "org/split"
    assert {r["file"] for r in _log(log2) if "/resolve/" in r["path"]} == {NAME_B}
    assert seen[-1].phase == "done" and seen[-1].bytes_done == seen[-1].bytes_total
    assert was_downloaded(store, "org/split")
    assert not staging_dir(store, "org/split").exists()


def test_short_disk_space_fails_before_any_download(spawn, tmp_path):
    root = tmp_path / "hub"
    files = FILES
    make_repo(root, "org/split", files)
    log = tmp_path / "hub.jsonl"
    hub = start_hub(spawn, root, "--log-requests", str(log))
    store = tmp_path / "store"
    store.mkdir()
    options = DownloadOptions(disk_margin_bytes=1 << 60)
    with pytest.raises(InsufficientDiskSpace, match="not enough disk space"):
        ModelFetch(
            ModelStorage(store),
            store,
            _manifest(hub, files),
            allowed_hosts=["127.0.0.1"],
            options=options,
        ).run()
    assert not [r for r in _log(log) if "/resolve/" in r["path"]]


# --- transfer worker pool, concurrent files ---------------------------------------------


def _sharded_repo(tmp_path, shards: int = 3) -> dict[str, bytes]:
    """A safetensors model whose shards (~9.6 MB) take the parallel-range worker path."""
    model = tmp_path / "gen"
    write_safetensors_model(model, shards=shards, shape=(1_200_000,))
    files = {p.name: p.read_bytes() for p in sorted(model.iterdir())}
    shard_names = [n for n in files if n.endswith(".safetensors")]
    assert all(len(files[n]) >= PARALLEL_MIN_BYTES for n in shard_names)
    make_repo(tmp_path / "hub", "org/split", files)
    return files


def _fetch(store, base, files, model_id, **kwargs):
    return ModelFetch(
        ModelStorage(store),
        store,
        _manifest(base, files, model_id),
        allowed_hosts=["127.0.0.1"],
        **kwargs,
    )


def test_transfer_workers_are_reused_across_models(spawn, tmp_path):
    files = _sharded_repo(tmp_path, shards=2)
    hub = start_hub(spawn, tmp_path / "hub")
    store = tmp_path / "store"
    store.mkdir()
    pool = TransferPool(2)
    try:
        _fetch(store, hub, files, "org/first", pool=pool).run()
        first = set(pool.pids())
        _fetch(store, hub, files, "org/second", pool=pool).run()
        second = set(pool.pids())
    finally:
        pool.close()
    assert first and first == second  # the same processes served both models
    assert {"org/first", "org/second"} <= set(ModelStorage(store).list_available())
    assert not pool.pids()  # close() stops them


def test_default_pool_is_shared_by_every_fetch_in_the_process():
    assert shared_pool() is shared_pool()
    assert (
        ModelFetch(None, Path("."), Manifest("org/x", ()), allowed_hosts=[])._pool
        is shared_pool()
    )  # noqa: SLF001 - the wiring is what is tested


def test_files_download_concurrently_and_each_is_verified(spawn, tmp_path):
    files = _sharded_repo(tmp_path, shards=3)
    log = tmp_path / "hub.jsonl"
    # Capped so that each shard takes a while; one shard is corrupted once (refetched).
    hub = start_hub(
        spawn,
        tmp_path / "hub",
        "--log-requests",
        str(log),
        "--bandwidth",
        "20M",
        "--fault",
        "corrupt:file=model-00002-of-00003.safetensors,times=1",
    )
    store = tmp_path / "store"
    store.mkdir()
    seen: list[DownloadProgress] = []
    desc = _fetch(
        store,
        hub,
        files,
        "org/split",
        options=DownloadOptions(connections=8),
        progress=seen.append,
    ).run()
    assert desc.id == "org/split"
    for name, data in files.items():
        assert (store / "org/split" / name).read_bytes() == data
    shard_log = [r for r in _log(log) if (r["file"] or "").endswith(".safetensors")]
    assert sum(1 for r in shard_log if "corrupt" in r["faults"]) == 1
    # Concurrency: the shards' ranges completed interleaved, not file after file.
    order = [r["file"] for r in shard_log]
    switches = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)
    assert switches > len(files)
    assert seen[-1].phase == "done" and seen[-1].bytes_done == seen[-1].bytes_total
    assert all(p.bytes_done <= p.bytes_total for p in seen)


def test_a_failing_file_never_promotes_a_partial_model(spawn, tmp_path):
    files = _sharded_repo(tmp_path, shards=3)
    hub = start_hub(
        spawn,
        tmp_path / "hub",
        "--fault",
        "corrupt:file=model-00003-of-00003.safetensors,times=always",
    )
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(IntegrityCheckFailed, match="model-00003-of-00003.safetensors: sha256"):
        _fetch(store, hub, files, "org/split").run()
    assert "org/split" not in ModelStorage(store).list_available()
    assert not (store / "org/split").exists()
    staged = staging_dir(store, "org/split")
    verified = orjson.loads((staged / VERIFIED_FILENAME).read_bytes())
    assert "model-00003-of-00003.safetensors" not in verified
    for name, info in verified.items():  # whatever was kept passed its own check
        assert info["sha256"] == hashlib.sha256(files[name]).hexdigest()
        assert (staged / "files" / name).read_bytes() == files[name]


def test_a_worker_killed_mid_download_is_replaced_and_the_file_completes(spawn, tmp_path):
    files = _sharded_repo(tmp_path, shards=2)
    hub = start_hub(spawn, tmp_path / "hub", "--bandwidth", "4M")
    store = tmp_path / "store"
    store.mkdir()
    pool = TransferPool(1)
    killed: list[int] = []

    def kill_once(progress: DownloadProgress) -> None:
        mid_shard = (progress.filename or "").endswith(".safetensors") and (
            0 < progress.file_bytes_done < progress.file_bytes_total
        )
        if not killed and mid_shard and (pids := pool.pids()):
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    options = DownloadOptions(connections=8, backoff_base_s=0.05, parallel_files=1)
    try:
        desc = _fetch(
            store, hub, files, "org/split", pool=pool, options=options, progress=kill_once
        ).run()
        after = pool.pids()
    finally:
        pool.close()
    assert killed and after and killed[0] not in after  # a fresh worker took over
    assert desc.id == "org/split"
    for name, data in files.items():
        assert (store / "org/split" / name).read_bytes() == data


def test_cancel_kills_the_running_transfer(spawn, tmp_path):
    files = _sharded_repo(tmp_path, shards=2)
    hub = start_hub(spawn, tmp_path / "hub", "--bandwidth", "1M")
    store = tmp_path / "store"
    store.mkdir()
    pool = TransferPool(2)
    fetch = _fetch(
        store, hub, files, "org/split", pool=pool, options=DownloadOptions(connections=2)
    )
    result: list[BaseException] = []

    def run() -> None:
        try:
            fetch.run()
        except BaseException as exc:  # noqa: BLE001 - inspected below
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until(lambda: len(pool.pids()) == 2 and fetch._state.bytes_done > 0, timeout=30)  # noqa: SLF001
        busy = pool.pids()
        fetch.cancel()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert result and isinstance(result[0], DownloadCancelled)
        assert not any(pid in pool.pids() for pid in busy)  # both transfers were killed
    finally:
        pool.close()
    assert "org/split" not in ModelStorage(store).list_available()


# --- the following hasher ---------------------------------------------------------------


def test_following_hasher_matches_a_file_written_out_of_order(tmp_path):
    path = tmp_path / "f.part"
    chunk, count = 256 << 10, 24
    data = os.urandom(chunk * count + 1234)
    hasher = FollowingHasher(path, len(data), block=64 << 10)
    hasher.start()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        offsets = list(range(0, len(data), chunk))
        for window in range(0, len(offsets), 4):  # four ranges in flight, landing backwards
            for off in reversed(offsets[window : window + 4]):
                os.pwrite(fd, data[off : off + chunk], off)
                hasher.poke()
    finally:
        os.close(fd)
    assert hasher.finish() == hashlib.sha256(data).hexdigest()
    assert hasher.hashed == len(data)


def test_following_hasher_reports_a_short_file(tmp_path):
    path = tmp_path / "short.part"
    path.write_bytes(b"x" * 1000)
    hasher = FollowingHasher(path, 2000)
    hasher.start()
    with pytest.raises(OSError, match="shorter than 2000 bytes"):
        hasher.finish()


def test_a_load_ahead_whose_file_was_moved_first_leaves_the_load_to_the_verified_file(tmp_path):
    """The hash can win the race: the landed file is verified and promoted (renamed) before
    the load during the hash gets its turn. That load is skipped, not failed in llama.cpp;
    the verified file loads the usual way."""
    import asyncio

    from llmlb.node.models.download.load_ahead import LoadAhead

    calls: list[tuple[str, str]] = []

    async def load(model_id: str, path: str) -> None:
        calls.append((model_id, path))

    async def unload(model_id: str) -> None:
        calls.append(("unload", model_id))

    async def scenario() -> tuple[bool, bool]:
        ahead = LoadAhead(asyncio.get_running_loop(), "org/model", load, unload)
        landed = tmp_path / "model.gguf.part-1-0"
        landed.write_bytes(b"GGUF")
        ahead.landed(landed)
        await asyncio.sleep(0)  # landed() hands the load to the loop with call_soon
        first = await ahead.settle()
        landed.rename(tmp_path / "model.gguf")  # promoted before the next load's turn
        ahead.landed(landed)
        await asyncio.sleep(0)
        second = await ahead.settle()
        return first, second

    first, second = asyncio.run(scenario())
    assert first is True and second is True  # the first load stands; the second is skipped
    assert calls == [("org/model", str(tmp_path / "model.gguf.part-1-0"))]
