"""The hub stand-in against the real huggingface_hub client, hf_transfer and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import hf_transfer
import orjson
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import snapshot_download as hf_snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from llmlb.testing.hub_standin.app import parse_range
from llmlb.testing.hub_standin.faults import parse_fault
from llmlb.testing.hub_standin.repos import LFS_THRESHOLD_BYTES, git_blob_id, is_lfs
from llmlb.testing.hub_standin.server import parse_rate

from tests.hub_fixtures import HubUrl, make_repo, start_hub
from tests.procs import spawner, wait_until

GGUF = os.urandom(3 * 1024 * 1024 + 17)
CONFIG = b'{"model_type": "llama"}\n'


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """``(status, headers, body)`` of one request; body is what arrived before EOF."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.request(method, parsed.path, headers=headers or {})
        resp = conn.getresponse()
        try:
            body = resp.read()
        except http.client.IncompleteRead as exc:
            body = exc.partial
        return resp.status, resp.headers, body
    finally:
        conn.close()


def _log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubUrl]:
    """One stand-in shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("hub-root")
    make_repo(
        root,
        "Org/Tiny",
        {
            "model-Q8_0.gguf": GGUF,
            "config.json": CONFIG,
            "sub/dir/notes.txt": b"hello\n",
        },
    )
    spawn, stop_all = spawner(tmp_path_factory.mktemp("hub-log"))
    try:
        yield start_hub(spawn, root, "--log-requests", str(root / "requests.jsonl"))
    finally:
        stop_all()


# ---- pure helpers --------------------------------------------------------------------------


def test_parse_range_and_rate() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 1)
    assert parse_range("bytes=5-", 10) == (5, 10)
    assert parse_range("bytes=-3", 10) == (7, 10)
    assert parse_range("bytes=2-100", 10) == (2, 10)
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("bytes=0-1,4-5", 10) is None
    assert parse_rate("25M") == 25e6
    assert parse_rate("1.5Mi") == 1.5 * 2**20
    assert parse_rate("1000") == 1000
    with pytest.raises(ValueError):
        parse_rate("fast")


def test_parse_fault_specs() -> None:
    drop = parse_fault("drop:file=*.gguf,after=1024,times=2")
    assert (drop.kind, drop.file, drop.after, drop.times, drop.method) == (
        "drop",
        "*.gguf",
        1024,
        2,
        "GET",
    )
    status = parse_fault("status:code=502,times=always,route=api")
    assert (status.code, status.times, status.route, status.method) == (502, None, "api", "any")
    assert status.applies("api", "GET", "org/x", None)
    assert not status.applies("resolve", "GET", "org/x", "f")
    for bad in ("explode", "drop:after=-1", "status:code=200", "drop:route=api", "drop:nope=1"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_lfs_rule() -> None:
    assert is_lfs("model.gguf", 10)
    assert is_lfs("x/model-00001-of-00002.safetensors", 10)
    assert is_lfs("tokenizer.json", LFS_THRESHOLD_BYTES)
    assert not is_lfs("tokenizer.json", LFS_THRESHOLD_BYTES - 1)
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob


# ---- metadata routes through huggingface_hub -------------------------------------------------


def test_model_info_with_files_metadata(hub: HubUrl) -> None:
    api = HfApi(endpoint=hub, token=False)
    info = api.model_info("Org/Tiny", files_metadata=True)
    assert info.id == "Org/Tiny"
    assert len(info.sha) == 40 and int(info.sha, 16) >= 0
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"model-Q8_0.gguf", "config.json", "sub/dir/notes.txt"}
    gguf = siblings["model-Q8_0.gguf"]
    assert gguf.size == len(GGUF)
    assert gguf.lfs.sha256 == _sha256(GGUF) and gguf.lfs.size == len(GGUF)
    assert gguf.lfs.pointer_size > 100
    config = siblings["config.json"]
    assert config.lfs is None and config.size == len(CONFIG)
    assert config.blob_id == git_blob_id(CONFIG)
    # The commit sha and "main" name the same snapshot; the repo id is matched case-insensitively.
    pinned = api.model_info("Org/Tiny", revision=info.sha, files_metadata=True)
    assert pinned.sha == info.sha
    assert api.model_info("org/tiny").sha == info.sha
    # Without files_metadata the siblings carry names only, like the hub.
    assert api.model_info("Org/Tiny").siblings[0].size is None


def test_tree_and_paths_info(hub: HubUrl) -> None:
    api = HfApi(endpoint=hub, token=False)
    top = {entry.path: entry for entry in api.list_repo_tree("Org/Tiny")}
    assert set(top) == {"sub", "model-Q8_0.gguf", "config.json"}
    assert top["model-Q8_0.gguf"].lfs.sha256 == _sha256(GGUF)
    deep = {entry.path for entry in api.list_repo_tree("Org/Tiny", recursive=True)}
    assert deep == {"sub", "sub/dir", "sub/dir/notes.txt", "model-Q8_0.gguf", "config.json"}
    inner = list(api.list_repo_tree("Org/Tiny", path_in_repo="sub/dir", expand=True))
    assert [e.path for e in inner] == ["sub/dir/notes.txt"]
    assert inner[0].last_commit is not None
    infos = api.get_paths_info("Org/Tiny", ["config.json", "sub", "missing.bin"])
    assert sorted(e.path for e in infos) == ["config.json", "sub"]
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("Org/Tiny", path_in_repo="nowhere"))


def test_hub_error_codes_raise_real_exceptions(hub: HubUrl) -> None:
    api = HfApi(endpoint=hub, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("Org/Missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("Org/Tiny", revision="v9.9")
    with pytest.raises(RemoteEntryNotFoundError):
        get_hf_file_metadata(hf_hub_url("Org/Tiny", "nope.bin", endpoint=hub), token=False)
    status, headers, _ = _get(f"{hub}/Org/Missing/resolve/main/x.gguf")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"


# ---- downloads -----------------------------------------------------------------------------


def test_file_metadata_headers(hub: HubUrl) -> None:
    info = HfApi(endpoint=hub, token=False).model_info("Org/Tiny")
    meta = get_hf_file_metadata(
        hf_hub_url("Org/Tiny", "model-Q8_0.gguf", endpoint=hub), token=False
    )
    assert (meta.commit_hash, meta.etag, meta.size) == (info.sha, _sha256(GGUF), len(GGUF))
    status, headers, _ = _get(f"{hub}/Org/Tiny/resolve/main/config.json", method="HEAD")
    assert status == 200 and "X-Linked-Size" not in headers
    assert headers["ETag"] == f'"{git_blob_id(CONFIG)}"'
    assert headers["X-Repo-Commit"] == info.sha


def test_hf_hub_download_and_snapshot_download(hub: HubUrl, tmp_path: Path) -> None:
    path = hf_hub_download(
        "Org/Tiny", "model-Q8_0.gguf", endpoint=hub, token=False, cache_dir=tmp_path / "cache"
    )
    assert Path(path).read_bytes() == GGUF
    snap = Path(
        hf_snapshot_download("Org/Tiny", endpoint=hub, token=False, cache_dir=tmp_path / "cache2")
    )
    assert (snap / "config.json").read_bytes() == CONFIG
    assert (snap / "sub/dir/notes.txt").read_bytes() == b"hello\n"
    assert (snap / "model-Q8_0.gguf").read_bytes() == GGUF


def test_range_reads(hub: HubUrl) -> None:
    url = f"{hub}/Org/Tiny/resolve/main/model-Q8_0.gguf"
    status, headers, body = _get(url, {"Range": "bytes=100-199"})
    assert status == 206 and body == GGUF[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(GGUF)}"
    assert _get(url, {"Range": "bytes=-10"})[2] == GGUF[-10:]
    assert _get(url, {"Range": f"bytes={len(GGUF) - 5}-"})[2] == GGUF[-5:]
    status, headers, _ = _get(url, {"Range": f"bytes={len(GGUF)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(GGUF)}"
    # Many concurrent range connections (hf_transfer) reassemble the exact file.
    pieces = [(start, min(start + 65536, len(GGUF)) - 1) for start in range(0, len(GGUF), 65536)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        parts = list(pool.map(lambda r: _get(url, {"Range": f"bytes={r[0]}-{r[1]}"})[2], pieces))
    assert b"".join(parts) == GGUF


def test_hf_transfer_parallel_download(hub: HubUrl, tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    hf_transfer.download(
        url=f"{hub}/Org/Tiny/resolve/main/model-Q8_0.gguf",
        filename=str(target),
        max_files=16,
        chunk_size=256 * 1024,
    )
    assert target.read_bytes() == GGUF


def test_request_log_records_authorization_presence(hub: HubUrl, tmp_path: Path) -> None:
    log = hub.root / "requests.jsonl"
    hf_hub_download(
        "Org/Tiny", "config.json", endpoint=hub, token="hf_secret_abc", cache_dir=tmp_path / "a"
    )
    hf_hub_download(
        "Org/Tiny", "sub/dir/notes.txt", endpoint=hub, token=False, cache_dir=tmp_path / "b"
    )
    entries = wait_until(
        lambda: [
            e
            for e in _log(log)
            if e["file"] in ("config.json", "sub/dir/notes.txt") and e["method"] == "GET"
        ],
        message="log entries",
    )
    by_file = {e["file"]: e for e in entries}
    assert by_file["config.json"]["authorization"] is True
    assert by_file["sub/dir/notes.txt"]["authorization"] is False
    assert by_file["config.json"]["status"] == 200
    assert by_file["config.json"]["bytes"] == len(CONFIG)
    assert b"hf_secret_abc" not in log.read_bytes()


# ---- repos changing while running, symlinks, the real model ----------------------------------


def test_rescan_picks_up_new_repos_and_changes(hub: HubUrl) -> None:
    api = HfApi(endpoint=hub, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("Late/Comer")
    make_repo(hub.root, "Late/Comer", {"a.gguf": b"one"})
    first = api.model_info("Late/Comer", files_metadata=True)
    assert first.siblings[0].lfs.sha256 == _sha256(b"one")
    make_repo(hub.root, "Late/Comer", {"a.gguf": b"two!"})
    second = api.model_info("Late/Comer", files_metadata=True)
    assert second.sha != first.sha
    assert second.siblings[0].lfs.sha256 == _sha256(b"two!")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("Late/Comer", revision=first.sha)


def test_serves_linked_real_model(spawn, tmp_path: Path, gemma_gguf: Path) -> None:
    root = tmp_path / "root"
    repo = make_repo(root, "ggml-org/gemma", {"gemma-3-270m-it-Q4_K_M.gguf": gemma_gguf})
    (repo / "link.gguf").symlink_to(gemma_gguf)
    cache = tmp_path / "hashes.json"
    hub = start_hub(spawn, root, "--hash-cache", str(cache))
    info = HfApi(endpoint=hub, token=False).model_info("ggml-org/gemma", files_metadata=True)
    sizes = {s.rfilename: (s.size, s.lfs.sha256) for s in info.siblings}
    assert sizes["link.gguf"] == sizes["gemma-3-270m-it-Q4_K_M.gguf"]
    assert sizes["link.gguf"][0] == gemma_gguf.stat().st_size
    st = gemma_gguf.stat()
    cached = orjson.loads(cache.read_bytes())  # hashed once, reused by later start-ups
    assert (
        cached[f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"][1] == sizes["link.gguf"][1]
    )
    status, _, body = _get(f"{hub}/ggml-org/gemma/resolve/main/link.gguf", {"Range": "bytes=0-3"})
    assert (status, body) == (206, b"GGUF")


# ---- faults, bandwidth, auth -----------------------------------------------------------------


@pytest.fixture
def fault_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    make_repo(root, "org/m", {"m.gguf": GGUF, "config.json": CONFIG})
    return root


def test_fault_drop_after_bytes(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--fault", "drop:file=*.gguf,after=1000,times=2")
    url = f"{hub}/org/m/resolve/main/m.gguf"
    assert _get(url)[2] == GGUF[:1000]
    status, _, body = _get(url, {"Range": "bytes=5000-9999"})
    assert status == 206 and body == GGUF[5000:6000]
    assert _get(url)[2] == GGUF  # spent after two drops
    assert _get(f"{hub}/org/m/resolve/main/config.json")[2] == CONFIG


def test_fault_status_then_success(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--fault", "status:code=503,times=2,route=any")
    api = HfApi(endpoint=hub, token=False)
    with pytest.raises(HfHubHTTPError) as info:
        api.model_info("org/m")
    assert info.value.response.status_code == 503
    assert _get(f"{hub}/org/m/resolve/main/m.gguf")[0] == 503
    assert api.model_info("org/m").id == "org/m"
    assert _get(f"{hub}/org/m/resolve/main/m.gguf")[2] == GGUF


def test_fault_corrupt_flips_one_byte(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--fault", "corrupt:file=m.gguf,offset=4096,times=1")
    url = f"{hub}/org/m/resolve/main/m.gguf"
    assert _get(url, {"Range": "bytes=0-99"})[2] == GGUF[:100]  # offset not covered: no fire
    body = _get(url)[2]
    assert len(body) == len(GGUF)
    assert [i for i in range(len(GGUF)) if body[i] != GGUF[i]] == [4096]
    assert body[4096] == GGUF[4096] ^ 0xFF
    assert _get(url)[2] == GGUF


def test_fault_corrupt_always(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--fault", "corrupt:times=always")
    url = f"{hub}/org/m/resolve/main/m.gguf"
    for _ in range(3):
        assert _sha256(_get(url)[2]) != _sha256(GGUF)


def test_fault_full_body_for_range(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--fault", "full:times=1")
    url = f"{hub}/org/m/resolve/main/m.gguf"
    status, headers, body = _get(url, {"Range": "bytes=10-19"})
    assert status == 200 and body == GGUF and "Content-Range" not in headers
    status, _, body = _get(url, {"Range": "bytes=10-19"})
    assert status == 206 and body == GGUF[10:20]


def test_fault_delay_first_byte(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--fault", "delay:seconds=3,file=m.gguf")
    url = f"{hub}/org/m/resolve/main/m.gguf"
    started = time.monotonic()
    assert _get(url, {"Range": "bytes=0-0"})[0] == 206
    assert time.monotonic() - started >= 2.95
    started = time.monotonic()
    assert _get(url, {"Range": "bytes=0-0"})[0] == 206
    assert time.monotonic() - started < 2.95  # not delayed again (a 1-byte loopback GET)


def test_bad_fault_spec_is_refused(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmlb.testing.hub_standin",
            "--root",
            str(tmp_path),
            "--fault",
            "boom",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "unknown fault kind" in result.stderr


def test_bandwidth_cap_per_connection(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--bandwidth", "4M")
    url = f"{hub}/org/m/resolve/main/m.gguf"
    started = time.monotonic()
    assert _get(url)[2] == GGUF
    elapsed = time.monotonic() - started
    assert elapsed >= len(GGUF) / 4e6 * 0.95  # ~0.79 s at 4 MB/s
    assert elapsed < 20
    # The cap is per connection: two halves in parallel each take about half as long.
    half = len(GGUF) // 2
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parts = list(
            pool.map(
                lambda r: _get(url, {"Range": r})[2], [f"bytes=0-{half - 1}", f"bytes={half}-"]
            )
        )
    assert b"".join(parts) == GGUF
    assert time.monotonic() - started >= half / 4e6 * 0.95


def test_total_bandwidth_is_shared_by_all_connections(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--total-bandwidth", "4M")
    url = f"{hub}/org/m/resolve/main/m.gguf"
    # Two halves in parallel take as long as the whole file at the total rate (not half).
    half = len(GGUF) // 2
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parts = list(
            pool.map(
                lambda r: _get(url, {"Range": r})[2], [f"bytes=0-{half - 1}", f"bytes={half}-"]
            )
        )
    assert b"".join(parts) == GGUF
    elapsed = time.monotonic() - started
    assert elapsed >= len(GGUF) / 4e6 * 0.9  # ~0.79 s at 4 MB/s in all
    assert elapsed < 20


def test_total_and_per_connection_caps_combine(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--total-bandwidth", "40M", "--bandwidth", "2M")
    url = f"{hub}/org/m/resolve/main/m.gguf"
    started = time.monotonic()
    assert _get(url)[2] == GGUF
    assert time.monotonic() - started >= len(GGUF) / 2e6 * 0.95  # the tighter cap holds


def test_require_token(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--require-token", "hf_good")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub, token=False).model_info("org/m")
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub, token="hf_bad").model_info("org/m")
    assert info.value.response.status_code == 401
    assert HfApi(endpoint=hub, token="hf_good").model_info("org/m").id == "org/m"


def test_parse_fail_first_and_redirect_ranges() -> None:
    fail = parse_fault("fail-first:6")
    assert (fail.kind, fail.n, fail.times, fail.method) == ("fail-first", 6, None, "GET")
    assert parse_fault("fail-first:n=2,file=*.gguf").file == "*.gguf"
    redirect = parse_fault("redirect-ranges:http://localhost:9/")
    assert (redirect.to, redirect.times, redirect.method) == ("http://localhost:9", None, "GET")
    assert parse_fault("redirect-ranges:to=https://x.example,repo=org/*").repo == "org/*"
    for bad in ("redirect-ranges", "redirect-ranges:ftp://x", "fail-first:n=-1", "fail-first:x"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_fault_fail_first_counts_per_file(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--fault", "fail-first:2")
    gguf, config = f"{hub}/org/m/resolve/main/m.gguf", f"{hub}/org/m/resolve/main/config.json"
    assert [_get(gguf)[0] for _ in range(2)] == [503, 503]
    assert _get(config)[0] == 503  # its own count
    assert _get(gguf, method="HEAD")[0] == 200  # only GETs count
    assert _get(gguf)[2] == GGUF and _get(gguf)[2] == GGUF  # recovered for good
    assert [_get(config)[0] for _ in range(2)] == [503, 200]


def test_fault_redirect_ranges_spares_the_probe(spawn, fault_root: Path) -> None:
    hub = start_hub(spawn, fault_root, "--fault", "redirect-ranges:http://localhost:9")
    path = "/org/m/resolve/main/m.gguf"
    status, headers, body = _get(f"{hub}{path}", {"Range": "bytes=0-0"})
    assert (status, body) == (206, GGUF[:1])
    status, headers, _ = _get(f"{hub}{path}", {"Range": "bytes=1048576-2097151"})
    assert status == 302 and headers["Location"] == f"http://localhost:9{path}"
    assert _get(f"{hub}{path}")[2] == GGUF  # no range: served
