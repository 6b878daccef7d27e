"""The state one model's download shares, and how one file's bytes land: the files a node
needs of a manifest, cancellation, transfer-worker and single-stream fetches hashed as they
arrive, the load ahead of the hash, and progress reports.

Apart from :mod:`.fetch` (the model's download: its files, retries, checks and promotion)
and :mod:`.peer_fetch` (peers and the swarm), which both build on it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlb.errors import DownloadCancelled, DownloadError, HostNotAllowed
from llmlb.model_storage import inspect_gguf, is_safe_relative_path
from llmlb.node.models.download.allowlist import no_proxy_entries
from llmlb.node.models.download.http import Http
from llmlb.node.models.download.load_ahead import LoadAhead
from llmlb.node.models.download.options import (
    MIB,
    DownloadOptions,
    DownloadProgress,
    ProgressCallback,
    chunk_size_for,
)
from llmlb.node.models.download.signals import Corrupt, Transient
from llmlb.node.models.download.workers import TransferPool, TransferWorker, shared_pool
from llmlb.node.models.hashing import FollowingHasher
from llmlb.node.models.pieces import PieceBoard
from llmlb.protocol import Manifest, ManifestFile, PeerSource

logger = logging.getLogger("llmlb.node.models.download.fetch")  # one name for a download's log


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
        if not is_safe_relative_path(spec.filename):
            raise DownloadError(f"{manifest.model_id}: unsafe filename {spec.filename!r}")
    return sorted(chosen, key=lambda f: (f.priority, f.filename))


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
    hub_only: bool = False  # refetch after a peer's bytes failed the check
    hub_bytes: int = 0  # of the current attempt, by source
    peer_bytes: dict[str, int] | None = None


BadPeerCallback = Callable[[PeerSource, str], None]


class FetchCore:
    """A download's shared state and byte movers; built through
    :class:`~llmlb.node.models.download.fetch.ModelFetch` (its arguments are documented there).
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
        peers: Sequence[PeerSource] = (),
        peer_token: str | None = None,
        on_bad_peer: BadPeerCallback | None = None,
        load_ahead: LoadAhead | None = None,
        board: PieceBoard | None = None,
        node_id: str | None = None,
        refresh_peers: Callable[[], Sequence[PeerSource]] | None = None,
        on_piece: Callable[[str, int], None] | None = None,
    ):
        self.store = store
        self.models_dir = Path(models_dir)
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.options = options or DownloadOptions()
        self.progress = progress
        self._http = Http(list(allowed_hosts), token, self.options.timeout_s)
        self._pool = pool if pool is not None else shared_pool()
        self._active: set[TransferWorker] = set()
        self._cancelled = threading.Event()  # cancel() was called
        self._stop = threading.Event()  # cancelled, or a required file failed
        self._lock = threading.RLock()  # progress, verified.json, active workers
        self._files = select_files(manifest)
        self._total = sum(f.size_bytes for f in self._files)
        self._state = _State()
        self._connections = self.options.connections
        self._peers = list(peers) if peer_token else []
        self._peer_token = peer_token
        self._on_bad_peer = on_bad_peer
        self._excluded: set[str] = set()  # peers bad or gone for this download
        self._peer_files: dict[str, int] = {}  # files in flight per peer
        self.bytes_from_hub = 0  # of verified files
        self.bytes_from_peers = 0
        self._ahead = load_ahead
        ggufs = [f for f in self._files if f.filename.endswith(".gguf")]
        self._ahead_file = (
            ggufs[0].filename if load_ahead is not None and len(ggufs) == 1 else None
        )
        self._verified_names: set[str] = set()
        self._landed: set[str] = set()  # files loaded ahead of their check
        self.last_byte_at: float | None = None  # monotonic time the last byte landed
        self._board = board if peer_token and node_id else None
        self._node_id = node_id or ""
        self._refresh_peers = refresh_peers
        self._on_piece = on_piece

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

    def _raise_if_cancelled(self) -> None:
        if self._stop.is_set():
            why = "cancelled" if self._cancelled.is_set() else "stopped (another file failed)"
            raise DownloadCancelled(f"{self.model_id}: download {why}")

    # -- transfers --

    @contextlib.contextmanager
    def _borrow_worker(self) -> Iterator[TransferWorker]:
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
        connections = self._connections
        job = {
            "url": url,
            "path": str(part),
            "connections": connections,
            "chunk_size": chunk_size_for(file.spec.size_bytes, connections),
            "headers": self._http.headers_for(url),
            "no_proxy": no_proxy_entries(self._http.allowed_hosts),
        }
        return self._transfer(file, job, part)[0]

    def _transfer(self, file: _FileProgress, job: dict, part: Path) -> tuple[str, dict]:
        """Run ``job`` on a transfer worker, hashing the file as it lands; returns the
        digest and the worker's final message."""
        spec = file.spec
        with self._borrow_worker() as worker:
            hasher = FollowingHasher(part, spec.size_bytes)
            hasher.start()

            def on_bytes(n: int) -> None:
                self._advance(file, n)
                hasher.poke()

            started = time.monotonic()
            try:
                result = worker.run(job, on_bytes)
            except Transient as exc:
                hasher.abort()
                hasher.join()
                refused = self._http.refused(str(exc))
                if refused is not None:
                    raise self._redirect_refused(spec, refused) from None
                raise
            except BaseException:
                hasher.abort()
                hasher.join()
                raise
        size = part.stat().st_size
        if size != spec.size_bytes:
            hasher.abort()
            hasher.join()
            raise Corrupt(f"{spec.filename}: size {size} != expected {spec.size_bytes}")
        transferred = time.monotonic()
        self._landed_at(transferred)
        self._land(spec, part)
        return self._hashed(file, hasher, started, transferred), result

    def _redirect_refused(self, spec: ManifestFile, url: str) -> HostNotAllowed:
        """The error of a transfer the hub redirected to ``url``, off the allowlist."""
        host = urllib.parse.urlparse(url).hostname
        return HostNotAllowed(
            f"{self.model_id}: {spec.filename}: the hub redirected the transfer to "
            f"{url}: host {host!r} is not on the download allowlist "
            f"({', '.join(self._http.allowed_hosts)}); no byte was taken from it"
        )

    def _hashed(
        self,
        file: _FileProgress,
        hasher: FollowingHasher,
        started: float,
        transferred: float,
        sources: str = "",
    ) -> str:
        """The digest of a transferred file once ``hasher`` read its tail; logs the transfer
        (``sources``: where its bytes came from) and the hash tail, and counts the file done."""
        spec = file.spec
        digest = hasher.finish()
        logger.info(
            "%s: %s: %.1f MiB in %.3fs%s, hash tail %.3fs",
            self.model_id,
            spec.filename,
            spec.size_bytes / MIB,
            transferred - started,
            sources,
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
            raise Transient(f"{url}: {exc}") from None
        self._landed_at(time.monotonic())
        return digest.hexdigest()

    def _landed_at(self, when: float) -> None:
        with self._lock:
            self.last_byte_at = max(self.last_byte_at or when, when)

    # -- load ahead --

    def _land(self, spec: ManifestFile, part: Path) -> None:
        """Start the load ahead of the hash when ``spec`` is the model's GGUF, every other
        required file is verified and the landed bytes' header and tensor layout are valid."""
        if self._ahead is None or spec.filename != self._ahead_file:
            return
        others = {f.filename for f in self._files if not f.optional} - {spec.filename}
        if not others <= self._verified_names:
            return
        problems = inspect_gguf(part)["problems"]
        if problems:
            logger.info("%s: not loaded ahead: %s", self.model_id, "; ".join(problems))
            return
        self._landed.add(spec.filename)
        self._ahead.landed(part)

    def _unland(self, spec: ManifestFile) -> None:
        """The landed ``spec`` is discarded: unload what it loaded ahead."""
        if self._ahead is not None and spec.filename in self._landed:
            self._landed.discard(spec.filename)
            self._ahead.discarded()

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
                bytes_from_hub=self.bytes_from_hub,
                bytes_from_peers=self.bytes_from_peers,
            )
            self.progress(snapshot)
