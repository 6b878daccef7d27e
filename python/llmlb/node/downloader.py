"""Verified, resumable, atomic model downloads from the hub into the node's store.

One model at a time per store (a file lock), files fetched straight from the hub URLs of the
router's manifest with ``hf_transfer`` parallel range requests (run in long-lived worker
processes shared by the whole node, :class:`TransferPool`, see
:mod:`llmlb.node.transfer_worker`), several files of a model at once, each hashed while its
bytes arrive (:mod:`llmlb.node.hashing`), staged under
``<models_dir>/.staging/<id>/`` and renamed into ``<models_dir>/<id>/`` only once every
required file passed its size and SHA-256 check. Verified files survive a crash or a kill
(``verified.json`` in the staging directory) and are not fetched again.

Standalone use (``llmlb pull``)::

    desc = pull_model("org/name", router_url=..., api_key=..., models_dir=...,
                      progress=lambda p: print(p.bytes_done, p.bytes_total))
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import orjson
from filelock import FileLock

from llmlb import config, lifecycle
from llmlb.errors import LlmlbError
from llmlb.node.hashing import FollowingHasher, sha256_file
from llmlb.node.settings import DEFAULT_CONNECTIONS
from llmlb.node.templates import CHAT_TEMPLATE_FILENAME
from llmlb.protocol import Manifest, ManifestFile

logger = logging.getLogger(__name__)

STAGING_DIRNAME = ".staging"
LOCKS_DIRNAME = ".locks"
DOWNLOADED_DIRNAME = ".downloaded"
VERIFIED_FILENAME = "verified.json"
# Files smaller than this are fetched with one plain GET (parallel ranges do not pay off).
PARALLEL_MIN_BYTES = 8 << 20
# Fewest range connections a large file gets when several share the budget.
MIN_FILE_CONNECTIONS = 8
MIB = 1 << 20


# --- errors ------------------------------------------------------------------------------


class DownloadError(LlmlbError):
    """A model could not be downloaded; ``str(exc)`` names the model and the reason."""


class HostNotAllowed(DownloadError):
    """A file URL (or a redirect) points at a host that is not on the download allowlist."""


class InsufficientDiskSpace(DownloadError):
    """The store's file system has less free space than the files still to fetch."""


class IntegrityError(DownloadError):
    """A file failed its size or SHA-256 check twice."""


class ModelNotRegistered(DownloadError):
    """The router has no model with this id (its manifest answered 404)."""


class RouterUnavailable(DownloadError):
    """The router could not be asked for the manifest."""


class DownloadCancelled(DownloadError):
    """The download was cancelled (node shutting down)."""


class _Transient(Exception):
    """A failure worth retrying (5xx, dropped connection, timeout)."""


class _Corrupt(Exception):
    """A file arrived with the wrong size or digest."""


# --- manifest ----------------------------------------------------------------------------


def local_backends() -> frozenset[str]:
    """Backend tags of backend-specific files this node can use (``metal`` on Apple)."""
    tags = {"cpu"}
    if sys.platform == "darwin":
        tags.add("metal")
    return frozenset(tags)


def select_files(manifest: Manifest, backends: Iterable[str] | None = None) -> list[ManifestFile]:
    """Files this node needs, primary first: drops files for other backends.

    Raises:
        DownloadError: a filename is not a safe relative path.
    """
    have = frozenset(backends) if backends is not None else local_backends()
    chosen = [f for f in manifest.files if not f.backends or have.intersection(f.backends)]
    for spec in chosen:
        path = PurePosixPath(spec.filename)
        if (
            not spec.filename
            or path.is_absolute()
            or any(part in ("", ".", "..") for part in spec.filename.split("/"))
            or "\\" in spec.filename
        ):
            raise DownloadError(f"{manifest.model_id}: unsafe filename {spec.filename!r}")
    return sorted(chosen, key=lambda f: (f.priority, f.filename))


def fetch_manifest(
    router_url: str, api_key: str | None, model_id: str, timeout: float = 10.0
) -> Manifest:
    """Ask the router for ``model_id``'s manifest (blocking).

    Raises:
        ModelNotRegistered: the router answered 404.
        RouterUnavailable: the router is unreachable or answered another error.
    """
    quoted = urllib.parse.quote(model_id, safe="")
    url = f"{router_url.rstrip('/')}/v0/models/registry/{quoted}/manifest.json"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as resp:
            return Manifest.from_dict(orjson.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise ModelNotRegistered(
                f"model {model_id!r} is not registered with the router"
            ) from None
        raise RouterUnavailable(
            f"router answered {exc.code} for the manifest of {model_id!r}: {_error_text(exc)}"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise RouterUnavailable(f"cannot fetch the manifest of {model_id!r}: {exc}") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return orjson.loads(exc.read())["error"]["message"]
    except Exception:  # noqa: BLE001 - best effort
        return exc.reason if isinstance(exc.reason, str) else ""


# --- allowlist ---------------------------------------------------------------------------


def host_allowed(url: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether ``url`` is http(s) on an allowlisted host (``*.example.com`` = subdomains)."""
    parsed = urllib.parse.urlparse(url)
    host = (parsed.hostname or "").lower().rstrip(".")
    if parsed.scheme not in ("http", "https") or not host:
        return False
    for pattern in allowed_hosts:
        pattern = pattern.lower().strip().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


def no_proxy_entries(allowed_hosts: Iterable[str]) -> str:
    """The allowlist as a ``NO_PROXY`` value for the transfer worker's guard.

    ``*.example.com`` becomes ``.example.com``. ``NO_PROXY`` matching also admits subdomains
    of a plain entry, so the guard inside a transfer is that much looser than
    :func:`host_allowed`, which every probe and redirect hop resolved before it passes.
    """
    entries = []
    for pattern in allowed_hosts:
        pattern = pattern.lower().strip().rstrip(".")
        if pattern:
            entries.append(pattern[1:] if pattern.startswith("*.") else pattern)
    return ",".join(dict.fromkeys(entries))


# A transfer's error names the URL it could not fetch (the guard refused a redirect to it).
_FAILED_URL = re.compile(r"for url \((\S+?)\)")


# --- progress and options ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DownloadProgress:
    """A snapshot of one model's download, passed to progress callbacks."""

    model_id: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    filename: str | None = None
    file_bytes_done: int = 0
    file_bytes_total: int = 0
    phase: str = "downloading"  # downloading | verifying | done


ProgressCallback = Callable[[DownloadProgress], None]


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    """Tuning of the downloader.

    Attributes:
        connections: parallel range connections (``hf_transfer`` ``max_files``) of a file
            downloading alone; large files downloading at once share them (at least
            ``MIN_FILE_CONNECTIONS`` each).
        parallel_files: files of one model fetched at once (each with its own hasher).
        max_attempts: attempts per file on transient failures (5xx, dropped connections).
        backoff_base_s: first retry delay; doubles up to ``backoff_max_s``.
        timeout_s: socket timeout of probes and single-stream GETs.
        disk_margin_bytes: free space kept beyond the bytes still to download.
    """

    connections: int = DEFAULT_CONNECTIONS
    parallel_files: int = 4
    max_attempts: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    timeout_s: float = 30.0
    disk_margin_bytes: int = 64 * MIB


def chunk_size_for(size: int, connections: int) -> int:
    """Range size for a file: about eight chunks per connection, 1–16 MiB, whole MiB.

    Small chunks keep the window of ranges in flight small, so the hasher that follows the
    written prefix is never far behind when the last range lands.
    """
    target = size // max(1, connections * 8)
    return max(1, min(16, target // MIB)) * MIB


# --- store paths -------------------------------------------------------------------------


def staging_dir(models_dir: Path, model_id: str) -> Path:
    """``<models_dir>/.staging/<id>/``."""
    return models_dir / STAGING_DIRNAME / model_id


def downloaded_marker(models_dir: Path, model_id: str) -> Path:
    """Record that this node downloaded ``model_id`` from the router (not placed by hand)."""
    return models_dir / DOWNLOADED_DIRNAME / f"{model_id}.json"


def was_downloaded(models_dir: Path, model_id: str) -> bool:
    """Whether ``model_id`` was downloaded from the router by a node on this store."""
    return downloaded_marker(models_dir, model_id).is_file()


def forget_downloaded(models_dir: Path, model_id: str) -> None:
    """Drop the downloaded-from-router record of ``model_id``."""
    downloaded_marker(models_dir, model_id).unlink(missing_ok=True)


def model_lock(models_dir: Path, model_id: str) -> FileLock:
    """The cross-process lock guarding ``model_id``'s download and promotion."""
    path = models_dir / LOCKS_DIRNAME / f"{model_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)


# --- HTTP --------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102, ANN001
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True, slots=True)
class _Probe:
    url: str  # after redirects
    size: int | None
    ranges: bool


class _Http:
    """Blocking HTTP for probes and single-stream GETs, enforcing the allowlist."""

    def __init__(self, allowed_hosts: list[str], token: str | None, timeout: float):
        self.allowed_hosts = allowed_hosts
        self.token = token
        self.timeout = timeout

    def headers_for(self, url: str) -> dict[str, str]:
        """Auth headers for ``url``: the hub token only ever goes to allowlisted hosts."""
        if self.token and host_allowed(url, self.allowed_hosts):
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def refused(self, message: str) -> str | None:
        """The non-allowlisted URL a failed transfer's ``message`` names, if any."""
        for url in _FAILED_URL.findall(message):
            if not host_allowed(url, self.allowed_hosts):
                return url
        return None

    def check(self, url: str, model_id: str) -> None:
        if not host_allowed(url, self.allowed_hosts):
            host = urllib.parse.urlparse(url).hostname
            raise HostNotAllowed(
                f"{model_id}: refusing to download {url}: host {host!r} is not on the "
                f"download allowlist ({', '.join(self.allowed_hosts)}; add it with --allow-host)"
            )

    def open(self, url: str, model_id: str, range_header: str | None):
        """GET ``url`` following redirects by hand (each hop checked); returns the response."""
        for _ in range(8):
            self.check(url, model_id)
            headers = self.headers_for(url)
            if range_header:
                headers["Range"] = range_header
            request = urllib.request.Request(url, headers=headers)
            try:
                return url, _OPENER.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                    url = urllib.parse.urljoin(url, exc.headers["Location"])
                    continue
                if exc.code >= 500 or exc.code == 429:
                    raise _Transient(f"HTTP {exc.code} from {url}") from None
                raise DownloadError(f"{model_id}: HTTP {exc.code} fetching {url}") from None
            except (OSError, urllib.error.URLError) as exc:
                raise _Transient(f"{url}: {exc}") from None
        raise DownloadError(f"{model_id}: too many redirects fetching {url}")

    def probe(self, url: str, model_id: str) -> _Probe:
        """One-byte range GET: final URL, total size, whether ranges are honoured."""
        final, resp = self.open(url, model_id, "bytes=0-0")
        with resp:
            if resp.status == 206:
                total = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
                return _Probe(final, int(total) if total.isdigit() else None, True)
            length = resp.headers.get("Content-Length")
            return _Probe(final, int(length) if length and length.isdigit() else None, False)


# --- the worker processes ----------------------------------------------------------------


class _TransferWorker:
    """A ``python -m llmlb.node.transfer_worker`` child, started on first use and reused.

    It runs one job at a time. A child that died (or was killed to cancel a transfer) is
    started again by the next job. Whenever a job ends other than with the child's own
    ``ok``/``error`` line, the child is killed, so that no stale progress line of an aborted
    job can reach the next one.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.starts = 0  # processes started over this worker's life

    @property
    def pid(self) -> int | None:
        """Process id of the running child, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> subprocess.Popen:
        """Start the child unless it is running (returns at once; it imports meanwhile)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self._proc
            if self._proc is not None:
                _reap(self._proc)
            self._proc = lifecycle.popen(  # its parent-death signal follows this process
                [sys.executable, "-m", "llmlb.node.transfer_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
            )
            self.starts += 1
            return self._proc

    def run(self, job: dict, on_bytes: Callable[[int], None]) -> None:
        """Run one job; raises ``_Transient`` when it fails."""
        proc = self.start()
        assert proc.stdin is not None and proc.stdout is not None
        in_sync = False
        try:
            proc.stdin.write(orjson.dumps(job) + b"\n")
            proc.stdin.flush()
            for line in proc.stdout:
                msg = orjson.loads(line)
                if "n" in msg:
                    on_bytes(int(msg["n"]))
                    continue
                in_sync = True
                if msg.get("ok"):
                    return
                raise _Transient(str(msg.get("error")))
            raise _Transient("transfer worker exited")
        except (OSError, ValueError) as exc:  # broken pipe, pipe closed by close()
            raise _Transient(f"transfer worker: {exc}") from None
        finally:
            if not in_sync:
                self.close()

    def close(self) -> None:
        """Stop the child (kills it if a transfer is still running); ``run`` restarts it."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()


class TransferPool:
    """Long-lived transfer worker processes shared by the downloads of one process.

    Workers start on first use (or :meth:`prestart`), are handed to one file at a time and
    kept between models, so a download does not pay an interpreter start. A worker exits by
    itself when this process dies (its stdin closes, or its next progress write fails).

    Args:
        size: most worker processes at once (files downloading in parallel, all models).
    """

    def __init__(self, size: int = 4):
        self.size = max(1, size)
        self._idle: list[_TransferWorker] = []
        self._busy: set[_TransferWorker] = set()
        self._cond = threading.Condition()
        self._closed = False

    def prestart(self, n: int) -> None:
        """Make sure up to ``n`` idle workers have a running (or starting) process."""
        with self._cond:
            while len(self._idle) + len(self._busy) < min(n, self.size):
                self._idle.append(_TransferWorker())
            workers = self._idle[-n:] if n > 0 else []
        for worker in workers:
            worker.start()

    @contextlib.contextmanager
    def worker(self, stop: threading.Event | None = None) -> Iterator[_TransferWorker]:
        """Borrow a worker for one job (waits while all are busy; gives up once ``stop``)."""
        with self._cond:
            while True:
                if self._closed:
                    raise DownloadCancelled("transfer workers are shut down")
                if stop is not None and stop.is_set():
                    raise DownloadCancelled("download cancelled")
                if self._idle:
                    worker = self._idle.pop()
                    break
                if len(self._busy) < self.size:
                    worker = _TransferWorker()
                    break
                self._cond.wait(0.1)
            self._busy.add(worker)
        try:
            yield worker
        finally:
            with self._cond:
                self._busy.discard(worker)
                if self._closed:
                    worker.close()
                else:
                    self._idle.append(worker)
                self._cond.notify()

    def pids(self) -> list[int]:
        """Process ids of the running workers (for tests and diagnostics)."""
        with self._cond:
            workers = [*self._idle, *self._busy]
        return [pid for w in workers if (pid := w.pid) is not None]

    def close(self) -> None:
        """Kill every worker; the pool refuses new jobs afterwards."""
        with self._cond:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle.clear()
            self._cond.notify_all()
        for worker in workers:
            worker.close()


_shared: tuple[int, TransferPool] | None = None
_shared_lock = threading.Lock()


def shared_pool() -> TransferPool:
    """This process's :class:`TransferPool` (created on first use, closed at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():  # a forked child makes its own
            pool = TransferPool(DownloadOptions().parallel_files)
            atexit.register(pool.close)
            _shared = (os.getpid(), pool)
        return _shared[1]


# --- one model ---------------------------------------------------------------------------


@dataclass
class _State:
    bytes_done: int = 0
    files_done: int = 0
    filename: str | None = None
    file_done: int = 0
    file_total: int = 0
    last_report: float = 0.0


@dataclass
class _FileProgress:
    """Bytes of one file counted into the model's progress so far (this attempt)."""

    spec: ManifestFile
    done: int = 0


class ModelFetch:
    """Download one model's files into the store; :meth:`run` blocks, :meth:`cancel` stops.

    Files are fetched concurrently (up to ``options.parallel_files``), each hashed while it
    arrives; the model is promoted only once every required file passed.

    Args:
        store: a ``llmlb.model_storage.ModelStorage`` over ``models_dir``.
        models_dir: the store root.
        manifest: the router's manifest of the model.
        allowed_hosts: download allowlist (hosts; ``*.`` prefix for subdomains).
        token: hub token, sent only to allowlisted hosts.
        progress: called with :class:`DownloadProgress` snapshots (one call at a time, from
            the download threads).
        options: tuning.
        pool: transfer workers to use (default: :func:`shared_pool`).
    """

    def __init__(
        self,
        store: Any,
        models_dir: Path,
        manifest: Manifest,
        *,
        allowed_hosts: list[str],
        token: str | None = None,
        progress: ProgressCallback | None = None,
        options: DownloadOptions | None = None,
        pool: TransferPool | None = None,
    ):
        self.store = store
        self.models_dir = Path(models_dir)
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.options = options or DownloadOptions()
        self.progress = progress
        self._http = _Http(list(allowed_hosts), token, self.options.timeout_s)
        self._pool = pool if pool is not None else shared_pool()
        self._active: set[_TransferWorker] = set()
        self._cancelled = threading.Event()  # cancel() was called
        self._stop = threading.Event()  # cancelled, or a required file failed
        self._lock = threading.RLock()  # progress, verified.json, active workers
        self._files = select_files(manifest)
        self._total = sum(f.size_bytes for f in self._files)
        self._state = _State()
        self._connections = self.options.connections

    def cancel(self) -> None:
        """Abort the download from another thread."""
        self._cancelled.set()
        self._halt()

    def _halt(self) -> None:
        self._stop.set()
        with self._lock:
            active = list(self._active)
        for worker in active:
            worker.close()

    def run(self) -> Any:
        """Download, verify and promote the model; returns its ``ModelDescriptor``.

        Raises:
            DownloadError: (or a subclass) naming the model and the reason.
        """
        for spec in self._files:
            self._http.check(spec.url, self.model_id)
        if not any(not f.optional for f in self._files):
            raise DownloadError(f"{self.model_id}: the manifest lists no file for this node")
        lock = model_lock(self.models_dir, self.model_id)
        try:
            self._acquire(lock)
            existing = self.store.resolve(self.model_id)
            if existing is not None:
                return existing
            self._check_target()
            return self._download_locked()
        finally:
            if lock.is_locked:
                lock.release()

    def _acquire(self, lock: FileLock) -> None:
        from filelock import Timeout

        while True:
            self._raise_if_cancelled()
            try:
                lock.acquire(timeout=0.5)
                return
            except Timeout:
                continue

    def _raise_if_cancelled(self) -> None:
        if self._stop.is_set():
            why = "cancelled" if self._cancelled.is_set() else "stopped (another file failed)"
            raise DownloadCancelled(f"{self.model_id}: download {why}")

    def _check_target(self) -> None:
        target = self.store.model_dir(self.model_id)
        if target.exists() and not was_downloaded(self.models_dir, self.model_id):
            reasons = "; ".join(self.store.validate(self.model_id)) or "not a valid model"
            raise DownloadError(
                f"{self.model_id}: {target} exists but is not a usable model ({reasons}); "
                "it was placed by hand, so the node leaves it alone — fix or remove it"
            )

    def _download_locked(self) -> Any:
        staging = staging_dir(self.models_dir, self.model_id)
        files_dir = staging / "files"
        files_dir.mkdir(parents=True, exist_ok=True)
        verified = self._load_verified(staging, files_dir)
        todo = [f for f in self._files if f.filename not in verified]
        self._state.bytes_done = sum(f.size_bytes for f in self._files if f.filename in verified)
        self._state.files_done = len(self._files) - len(todo)
        self._check_disk(files_dir, sum(f.size_bytes for f in todo))
        large = sum(1 for f in todo if f.size_bytes >= PARALLEL_MIN_BYTES)
        lanes = max(1, min(len(todo), self.options.parallel_files))
        big_lanes = max(1, min(large, lanes))
        # The connection budget is shared by the large files that download at once.
        self._connections = max(
            min(MIN_FILE_CONNECTIONS, self.options.connections),
            self.options.connections // big_lanes,
        )
        self._pool.prestart(big_lanes if large else 0)
        self._report(force=True)

        failed = threading.Event()  # a required file failed: start no further files

        def fetch(spec: ManifestFile) -> None:
            self._raise_if_cancelled()
            if failed.is_set():
                return
            try:
                digest = self._fetch_verified(spec, files_dir / spec.filename)
            except DownloadError as exc:
                if not spec.optional or isinstance(exc, DownloadCancelled):
                    raise
                logger.warning("%s: optional file %s skipped", self.model_id, spec.filename)
                return
            with self._lock:
                verified[spec.filename] = {"size": spec.size_bytes, "sha256": digest}
                _write_json(staging / VERIFIED_FILENAME, verified)
                self._state.files_done += 1
            self._report(force=True)

        if lanes == 1:
            for spec in todo:
                fetch(spec)
        else:
            self._fetch_all(fetch, todo, lanes, failed)
        return self._promote(staging, files_dir)

    def _fetch_all(
        self,
        fetch: Callable[[ManifestFile], None],
        todo: list[ManifestFile],
        lanes: int,
        failed: threading.Event,
    ) -> None:
        """Run ``fetch`` over ``todo`` on ``lanes`` threads; raise the first failure.

        After a failure no further file starts; files already in flight finish (and stay
        verified in staging for the next attempt) unless the download was cancelled.
        """
        first: BaseException | None = None
        with ThreadPoolExecutor(lanes, thread_name_prefix="fetch") as pool:
            futures = [pool.submit(fetch, spec) for spec in todo]
            for future in as_completed(futures):
                exc = future.exception()
                if exc is not None and first is None:
                    first = exc
                    failed.set()
        if first is not None:
            raise first

    def _load_verified(self, staging: Path, files_dir: Path) -> dict[str, dict]:
        """Verified files kept from an earlier attempt; anything else in staging is removed."""
        try:
            recorded = orjson.loads((staging / VERIFIED_FILENAME).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            recorded = {}
        wanted = {f.filename: f for f in self._files}
        verified: dict[str, dict] = {}
        for name, info in recorded.items() if isinstance(recorded, dict) else ():
            spec = wanted.get(name)
            path = files_dir / name
            if (
                spec is not None
                and isinstance(info, dict)
                and path.is_file()
                and path.stat().st_size == spec.size_bytes == info.get("size")
                and (spec.sha256 is None or info.get("sha256") == spec.sha256)
            ):
                verified[name] = info
        for path in sorted(files_dir.rglob("*"), reverse=True):
            rel = path.relative_to(files_dir).as_posix()
            if path.is_file() and rel not in verified:
                path.unlink()
        _write_json(staging / VERIFIED_FILENAME, verified)
        if verified:
            logger.info("%s: resuming, %d file(s) already verified", self.model_id, len(verified))
        return verified

    def _check_disk(self, where: Path, needed: int) -> None:
        free = shutil.disk_usage(where).free
        if needed + self.options.disk_margin_bytes > free:
            raise InsufficientDiskSpace(
                f"{self.model_id}: not enough disk space in {self.models_dir}: need "
                f"{needed / MIB:.1f} MiB (+{self.options.disk_margin_bytes / MIB:.0f} MiB margin), "
                f"{free / MIB:.1f} MiB free"
            )

    # -- one file --

    def _fetch_verified(self, spec: ManifestFile, dest: Path) -> str:
        """Fetch ``spec`` to ``dest``; a corrupt file is refetched once, then fails."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        file = _FileProgress(spec)
        for corrupt_try in range(2):
            part = dest.with_name(f"{dest.name}.part-{os.getpid()}-{corrupt_try}")
            try:
                digest = self._fetch_with_retries(file, part)
                self._verify(spec, part, digest)
            except _Corrupt as exc:
                part.unlink(missing_ok=True)
                self._restart(file)
                if corrupt_try == 1:
                    raise IntegrityError(f"{self.model_id}: {exc} (after one refetch)") from None
                logger.warning("%s: %s; fetching it again", self.model_id, exc)
                continue
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            os.replace(part, dest)
            return digest
        raise AssertionError("unreachable")

    def _verify(self, spec: ManifestFile, path: Path, streamed: str | None) -> str:
        size = path.stat().st_size
        if size != spec.size_bytes:
            raise _Corrupt(f"{spec.filename}: size {size} != expected {spec.size_bytes}")
        if spec.sha256 is None:
            return streamed or ""
        if streamed != spec.sha256:
            # The streamed digest may have raced the writer: confirm with a serial pass.
            logger.info("%s: %s: streamed digest differs; re-hashing", self.model_id, spec.filename)
            self._report(force=True, phase="verifying")
            streamed = sha256_file(path)
            if streamed != spec.sha256:
                raise _Corrupt(f"{spec.filename}: sha256 {streamed} != expected {spec.sha256}")
        return streamed

    def _fetch_with_retries(self, file: _FileProgress, part: Path) -> str:
        spec = file.spec
        delay = self.options.backoff_base_s
        for attempt in range(1, self.options.max_attempts + 1):
            self._raise_if_cancelled()
            self._restart(file)
            try:
                return self._fetch_once(file, part)
            except _Transient as exc:
                part.unlink(missing_ok=True)
                self._raise_if_cancelled()
                if attempt == self.options.max_attempts:
                    raise DownloadError(
                        f"{self.model_id}: {spec.filename}: giving up after {attempt} attempts: "
                        f"{exc}"
                    ) from None
                logger.warning(
                    "%s: %s: %s; retrying in %.1fs", self.model_id, spec.filename, exc, delay
                )
                if self._stop.wait(delay):
                    self._raise_if_cancelled()
                delay = min(delay * 2, self.options.backoff_max_s)
        raise AssertionError("unreachable")

    def _fetch_once(self, file: _FileProgress, part: Path) -> str:
        spec = file.spec
        probe = self._http.probe(spec.url, self.model_id)
        if probe.size is not None and probe.size != spec.size_bytes:
            raise _Corrupt(
                f"{spec.filename}: the hub serves {probe.size} bytes, the manifest says "
                f"{spec.size_bytes}"
            )
        if probe.ranges and spec.size_bytes >= PARALLEL_MIN_BYTES:
            return self._fetch_parallel(file, probe.url, part)
        return self._fetch_stream(file, probe.url, part)

    @contextlib.contextmanager
    def _borrow_worker(self) -> Iterator[_TransferWorker]:
        """A pool worker, registered so that :meth:`cancel` can kill its transfer."""
        with self._pool.worker(self._stop) as worker:
            with self._lock:
                self._active.add(worker)
            try:
                if self._stop.is_set():  # cancelled while we waited for the worker
                    self._raise_if_cancelled()
                yield worker
            finally:
                with self._lock:
                    self._active.discard(worker)

    def _fetch_parallel(self, file: _FileProgress, url: str, part: Path) -> str:
        spec = file.spec
        connections = self._connections
        job = {
            "url": url,
            "path": str(part),
            "connections": connections,
            "chunk_size": chunk_size_for(spec.size_bytes, connections),
            "headers": self._http.headers_for(url),
            "no_proxy": no_proxy_entries(self._http.allowed_hosts),
        }
        with self._borrow_worker() as worker:
            hasher = FollowingHasher(part, spec.size_bytes)
            hasher.start()

            def on_bytes(n: int) -> None:
                self._advance(file, n)
                hasher.poke()

            started = time.monotonic()
            try:
                worker.run(job, on_bytes)
            except _Transient as exc:
                hasher.abort()
                hasher.join()
                refused = self._http.refused(str(exc))
                if refused is not None:
                    host = urllib.parse.urlparse(refused).hostname
                    raise HostNotAllowed(
                        f"{self.model_id}: {spec.filename}: the hub redirected the transfer to "
                        f"{refused}: host {host!r} is not on the download allowlist "
                        f"({', '.join(self._http.allowed_hosts)}); no byte was taken from it"
                    ) from None
                raise
            except BaseException:
                hasher.abort()
                hasher.join()
                raise
        size = part.stat().st_size
        if size != spec.size_bytes:
            hasher.abort()
            hasher.join()
            raise _Corrupt(f"{spec.filename}: size {size} != expected {spec.size_bytes}")
        transferred = time.monotonic()
        digest = hasher.finish()
        logger.info(
            "%s: %s: %.1f MiB in %.3fs, hash tail %.3fs",
            self.model_id,
            spec.filename,
            spec.size_bytes / MIB,
            transferred - started,
            time.monotonic() - transferred,
        )
        self._advance(file, spec.size_bytes - file.done)
        return digest

    def _fetch_stream(self, file: _FileProgress, url: str, part: Path) -> str:
        import hashlib

        digest = hashlib.sha256()
        _, resp = self._http.open(url, self.model_id, None)
        try:
            with resp, open(part, "wb") as out:
                while True:
                    self._raise_if_cancelled()
                    block = resp.read(MIB)
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    self._advance(file, len(block))
        except (OSError, ValueError) as exc:  # dropped connection, IncompleteRead, timeout
            raise _Transient(f"{url}: {exc}") from None
        return digest.hexdigest()

    # -- progress --

    def _advance(self, file: _FileProgress, n: int) -> None:
        with self._lock:
            n = max(0, min(n, file.spec.size_bytes - file.done))
            file.done += n
            self._state.bytes_done += n
            self._state.filename = file.spec.filename
            self._state.file_done = file.done
            self._state.file_total = file.spec.size_bytes
        self._report()

    def _restart(self, file: _FileProgress) -> None:
        """Take back the bytes ``file`` counted so far (its attempt starts again)."""
        with self._lock:
            self._state.bytes_done -= file.done
            file.done = 0
            self._state.filename = file.spec.filename
            self._state.file_done = 0
            self._state.file_total = file.spec.size_bytes

    def _report(self, force: bool = False, phase: str = "downloading") -> None:
        if self.progress is None:
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self._state.last_report < 0.1:
                return
            self._state.last_report = now
            snapshot = DownloadProgress(
                model_id=self.model_id,
                bytes_done=max(0, self._state.bytes_done),
                bytes_total=self._total,
                files_done=self._state.files_done,
                files_total=len(self._files),
                filename=self._state.filename,
                file_bytes_done=self._state.file_done,
                file_bytes_total=self._state.file_total,
                phase=phase,
            )
            self.progress(snapshot)

    # -- promotion --

    def _promote(self, staging: Path, files_dir: Path) -> Any:
        """Check the staged files with the store's rules, then rename them into place."""
        from llmlb.model_storage import validate_file

        problems: list[str] = []
        for path in sorted(files_dir.rglob("*")):
            if path.suffix in (".gguf", ".safetensors") and path.is_file():
                problems += [f"{path.name}: {p}" for p in validate_file(path)]
        if problems:
            shutil.rmtree(staging, ignore_errors=True)
            raise DownloadError(
                f"{self.model_id}: downloaded files are invalid: " + "; ".join(problems)
            )
        template = self.manifest.chat_template
        if template and not (files_dir / CHAT_TEMPLATE_FILENAME).exists():
            (files_dir / CHAT_TEMPLATE_FILENAME).write_text(template)
        target = self.store.model_dir(self.model_id)
        if (other := self.store.conflicting_model(self.model_id)) is not None:
            raise DownloadError(f"{self.model_id}: model id conflict with {other} in the store")
        target.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if target.exists():  # an earlier download of ours that no longer validates
            old = staging / "old"
            os.replace(target, old)
        os.replace(files_dir, target)
        marker = downloaded_marker(self.models_dir, self.model_id)
        marker.parent.mkdir(parents=True, exist_ok=True)
        _write_json(
            marker,
            {
                "repo": self.manifest.repo,
                "revision": self.manifest.revision,
                "files": [f.filename for f in self._files],
                "downloaded_at": time.time(),
            },
        )
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        descriptor = self.store.resolve(self.model_id)
        if descriptor is None:
            reasons = "; ".join(self.store.validate(self.model_id)) or "rejected by the store"
            shutil.rmtree(target, ignore_errors=True)
            forget_downloaded(self.models_dir, self.model_id)
            raise DownloadError(f"{self.model_id}: downloaded model does not validate: {reasons}")
        self._report(force=True, phase="done")
        return descriptor


# --- standalone entry point --------------------------------------------------------------


def pull_model(
    model_id: str,
    *,
    router_url: str | None = None,
    api_key: str | None = None,
    models_dir: Path | None = None,
    allowed_hosts: Iterable[str] | None = None,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    options: DownloadOptions | None = None,
) -> Any:
    """Resolve ``model_id`` into the local store, node-first (blocking; used by ``llmlb pull``).

    Args:
        model_id: the model id (normalized with ``normalize_model_id``).
        router_url: router base URL (default ``llmlb.config.router_url()``).
        api_key: a node-scope key for the router (default ``llmlb.config.node_key()``).
        models_dir: store root (default ``llmlb.config.models_dir()``).
        allowed_hosts: download allowlist (default ``llmlb.config.default_allowed_hosts()``).
        token: hub token (default ``llmlb.config.hf_token()``).
        progress: receives :class:`DownloadProgress` snapshots.
        options: downloader tuning.

    Returns:
        The store's ``ModelDescriptor`` of the model.

    Raises:
        DownloadError: (or a subclass) naming the model and the reason.
        llmlb.model_storage.InvalidModelId: the id is malformed.
    """
    from llmlb.model_storage import ModelStorage, normalize_model_id

    model_id = normalize_model_id(model_id)
    root = Path(models_dir) if models_dir is not None else config.models_dir()
    root.mkdir(parents=True, exist_ok=True)
    store = ModelStorage(str(root))
    existing = store.resolve(model_id)
    if existing is not None:
        return existing
    manifest = fetch_manifest(
        router_url or config.router_url(),
        api_key if api_key is not None else config.node_key(),
        model_id,
    )
    manifest = replace(manifest, model_id=model_id)
    hosts = list(allowed_hosts) if allowed_hosts is not None else config.default_allowed_hosts()
    fetch = ModelFetch(
        store,
        root,
        manifest,
        allowed_hosts=hosts,
        token=token if token is not None else config.hf_token(),
        progress=progress,
        options=options,
    )
    return fetch.run()
