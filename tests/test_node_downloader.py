"""The downloader against a real hub stand-in: allowlist, token, resume, disk space."""

from __future__ import annotations

import hashlib

import orjson
import pytest
from llmlb.model_storage import ModelStorage
from llmlb.node import downloader as dl

from tests.factories import gguf_bytes, split_name
from tests.hub_fixtures import make_repo, start_hub

A = gguf_bytes(name="a", split=(1, 2), split_tensors_count=4)
B = gguf_bytes(name="b", split=(2, 2), split_tensors_count=4)
NAME_A, NAME_B = split_name("model", 1, 2), split_name("model", 2, 2)
FILES = {NAME_A: A, NAME_B: B}


def _manifest(base: str, files: dict[str, bytes], model_id: str = "org/split") -> dl.Manifest:
    specs = tuple(
        dl.FileSpec(
            name,
            len(data),
            hashlib.sha256(data).hexdigest(),
            f"{base}/org/split/resolve/main/{name}",
            priority=i,
        )
        for i, (name, data) in enumerate(files.items())
    )
    return dl.Manifest(model_id, specs)


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
    assert dl.host_allowed(url, allowed) is ok


def test_off_allowlist_url_is_refused_and_the_token_never_sent(spawn, tmp_path):
    root = tmp_path / "hub"
    files = FILES
    make_repo(root, "org/split", files)
    log = tmp_path / "hub.jsonl"
    hub = start_hub(spawn, root, "--log-requests", str(log))
    other_host = hub.replace("127.0.0.1", "localhost")
    store = tmp_path / "store"
    store.mkdir()
    fetch = dl.ModelFetch(
        ModelStorage(store),
        store,
        _manifest(other_host, files),
        allowed_hosts=["127.0.0.1"],
        token="hf_secret",
    )
    with pytest.raises(dl.HostNotAllowed, match="localhost"):
        fetch.run()
    assert not [r for r in _log(log) if "/resolve/" in r["path"]]
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
    options = dl.DownloadOptions(max_attempts=1)
    with pytest.raises(dl.DownloadError, match="404"):
        dl.ModelFetch(
            ModelStorage(store),
            store,
            _manifest(broken, files),
            allowed_hosts=["127.0.0.1"],
            options=options,
        ).run()
    assert "org/split" not in ModelStorage(store).list_available()
    assert (dl.staging_dir(store, "org/split") / "files" / NAME_A).is_file()

    log2 = tmp_path / "hub2.jsonl"
    healthy = start_hub(spawn, root, "--log-requests", str(log2))
    seen = []
    desc = dl.ModelFetch(
        ModelStorage(store),
        store,
        _manifest(healthy, files),
        allowed_hosts=["127.0.0.1"],
        progress=seen.append,
    ).run()
    assert desc.id == "org/split"
    assert {r["file"] for r in _log(log2) if "/resolve/" in r["path"]} == {NAME_B}
    assert seen[-1].phase == "done" and seen[-1].bytes_done == seen[-1].bytes_total
    assert dl.was_downloaded(store, "org/split")
    assert not dl.staging_dir(store, "org/split").exists()


def test_short_disk_space_fails_before_any_download(spawn, tmp_path):
    root = tmp_path / "hub"
    files = FILES
    make_repo(root, "org/split", files)
    log = tmp_path / "hub.jsonl"
    hub = start_hub(spawn, root, "--log-requests", str(log))
    store = tmp_path / "store"
    store.mkdir()
    options = dl.DownloadOptions(disk_margin_bytes=1 << 60)
    with pytest.raises(dl.InsufficientDiskSpace, match="not enough disk space"):
        dl.ModelFetch(
            ModelStorage(store),
            store,
            _manifest(hub, files),
            allowed_hosts=["127.0.0.1"],
            options=options,
        ).run()
    assert not [r for r in _log(log) if "/resolve/" in r["path"]]
