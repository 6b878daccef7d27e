"""One model's download: :class:`ModelFetch` (prepare, run, cancel) and the files a node
needs of a manifest (:func:`select_files`).

Files are fetched concurrently, each hashed while it arrives (large ones by a transfer worker,
:mod:`.workers`, small ones by one GET, :mod:`.http`), recorded as verified in staging, and the
model is promoted into the store once every required file passed (:mod:`.staging`).

Peers: given the router's list of nodes that hold the model (``peers``), each file with a
sha256 is fetched from one of them first (the least busy; the hub joins for the rest when
the peer is gone or slow, :mod:`.sources`), and verified exactly like a hub download. A file
that fails its check is refetched from the hub alone, and the peers that supplied its bytes
are reported (``on_bad_peer``) and not asked for anything of this model again. Files without
a sha256 always come from the hub: a peer's bytes are only ever taken against a digest.

Load ahead: given a :class:`~.load_ahead.LoadAhead`, the model's only GGUF starts loading
once all its bytes are on disk and its layout is valid (the other files verified), while its
hash finishes; a file that then fails its check is unloaded before it is discarded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from llmlb.errors import (
    DownloadCancelled,
    DownloadError,
    HostNotAllowed,
    InsufficientDiskSpace,
    IntegrityCheckFailed,
)
from llmlb.model_storage import inspect_gguf, is_safe_relative_path, staging_dir
from llmlb.node.models.download.allowlist import no_proxy_entries
from llmlb.node.models.download.http import Http
from llmlb.node.models.download.load_ahead import LoadAhead
from llmlb.node.models.download.options import (
    MIB,
    MIN_FILE_CONNECTIONS,
    PARALLEL_MIN_BYTES,
    DownloadOptions,
    DownloadProgress,
    ProgressCallback,
    chunk_size_for,
)
from llmlb.node.models.download.signals import Corrupt, Transient
from llmlb.node.models.download.staging import (
    VERIFIED_FILENAME,
    load_verified,
    model_lock,
    promote,
    was_downloaded,
    write_json,
)
from llmlb.node.models.download.workers import TransferPool, TransferWorker, shared_pool
from llmlb.node.models.hashing import FollowingHasher, sha256_file
from llmlb.node.models.pieces import PieceBoard
from llmlb.node.models.swarm import HubSource, SwarmFile
from llmlb.protocol import Manifest, ManifestFile, PeerSource

logger = logging.getLogger(__name__)


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

# A swarm download's GGUF is loaded ahead of its hash only when this much is left to hash:
# pieces land out of order, and when the hash is nearly done the file is renamed before the
# load has opened it.
AHEAD_MIN_TAIL = 64 * MIB


def peer_file_url(peer: PeerSource, model_id: str, filename: str) -> str:
    """Where ``peer`` serves ``filename`` of ``model_id`` (``/v0/peer/files/{id}/{name}``)."""
    quoted_id = urllib.parse.quote(model_id, safe="")
    return f"{peer.url.rstrip('/')}/v0/peer/files/{quoted_id}/{urllib.parse.quote(filename)}"


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
        peers: nodes that can serve the model's files (the manifest's ``peers``).
        peer_token: the fleet credential presented to them.
        on_bad_peer: called (from a download thread) with a peer whose bytes failed a file's
            check, and the reason.
        load_ahead: load the model from its landed GGUF while the hash finishes
            (:mod:`.load_ahead`); nothing is promoted before the check passed either way.
        board: the node's piece board: with it (and ``peer_token``, ``node_id``), files with a
            sha256 are fetched piece by piece from the swarm and the hub
            (:mod:`llmlb.node.models.swarm`), their pieces published as they land.
        node_id: this node's id (with ``board``).
        refresh_peers: returns the router's current peers of the model (blocking; asked
            twice a second while a swarm download runs).
        on_piece: called with each verified piece's source (``"hub"`` or a node id) and size.
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
        verified = load_verified(self.model_id, staging, files_dir, self._files)
        self._verified_names = set(verified)
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
                self._verified_names.add(spec.filename)
                write_json(staging / VERIFIED_FILENAME, verified)
                self._state.files_done += 1
            self._report(force=True)

        refresher = self._start_refresher()
        try:
            if lanes == 1:
                for spec in todo:
                    fetch(spec)
            else:
                self._fetch_all(fetch, todo, lanes, failed)
        finally:
            if refresher is not None:
                refresher.set()
        descriptor = promote(self.store, self.models_dir, self.manifest, self._files, staging)
        if self._board is not None:
            for spec in self._files:
                self._board.moved(
                    self.model_id,
                    spec.filename,
                    self.store.model_dir(self.model_id) / spec.filename,
                    complete=True,
                )
        self._report(force=True, phase="done")
        return descriptor

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
            except Corrupt as exc:
                self._unland(spec)
                if self._board is not None:
                    self._board.drop(self.model_id, spec.filename)
                part.unlink(missing_ok=True)
                self._restart(file)
                blamed = self._blame(file, str(exc))
                if corrupt_try == 1:
                    raise IntegrityCheckFailed(
                        f"{self.model_id}: {exc} (after one refetch)"
                    ) from None
                if blamed:
                    file.hub_only = True
                logger.warning(
                    "%s: %s%s; fetching it again%s",
                    self.model_id,
                    exc,
                    f" (bytes from peer {', '.join(blamed)})" if blamed else "",
                    " from the hub" if blamed else "",
                )
                continue
            except BaseException:
                self._unland(spec)
                part.unlink(missing_ok=True)
                raise
            self._landed.discard(spec.filename)  # verified: the load ahead stands
            os.replace(part, dest)
            if self._board is not None:
                self._board.moved(self.model_id, spec.filename, dest)
            with self._lock:
                self.bytes_from_hub += file.hub_bytes
                self.bytes_from_peers += sum((file.peer_bytes or {}).values())
            return digest
        raise AssertionError("unreachable")

    def _verify(self, spec: ManifestFile, path: Path, streamed: str | None) -> str:
        size = path.stat().st_size
        if size != spec.size_bytes:
            raise Corrupt(f"{spec.filename}: size {size} != expected {spec.size_bytes}")
        if spec.sha256 is None:
            return streamed or ""
        if streamed != spec.sha256:
            # The streamed digest may have raced the writer: confirm with a serial pass.
            logger.info("%s: %s: streamed digest differs; re-hashing", self.model_id, spec.filename)
            self._report(force=True, phase="verifying")
            streamed = sha256_file(path)
            if streamed != spec.sha256:
                raise Corrupt(f"{spec.filename}: sha256 {streamed} != expected {spec.sha256}")
        return streamed

    def _fetch_with_retries(self, file: _FileProgress, part: Path) -> str:
        spec = file.spec
        delay = self.options.backoff_base_s
        for attempt in range(1, self.options.max_attempts + 1):
            self._raise_if_cancelled()
            self._restart(file)
            try:
                return self._fetch_once(file, part)
            except Transient as exc:
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
        file.hub_bytes, file.peer_bytes = 0, {}
        if self._board is not None and spec.sha256 is not None and not file.hub_only:
            return self._fetch_swarm(file, part)
        peer = None if file.hub_only or spec.sha256 is None else self._pick_peer()
        try:
            probe = self._http.probe(spec.url, self.model_id)
        except (Transient, DownloadError):
            if peer is None:
                raise
            probe = None  # the hub is unreachable: the peer alone, then
        if probe is not None and probe.size is not None and probe.size != spec.size_bytes:
            self._release_peer(peer)
            raise Corrupt(
                f"{spec.filename}: the hub serves {probe.size} bytes, the manifest says "
                f"{spec.size_bytes}"
            )
        if peer is not None:
            try:
                return self._fetch_sources(file, peer, probe, part)
            finally:
                self._release_peer(peer)
        assert probe is not None
        if probe.ranges and spec.size_bytes >= PARALLEL_MIN_BYTES:
            digest = self._fetch_parallel(file, probe.url, part)
        else:
            digest = self._fetch_stream(file, probe.url, part)
        file.hub_bytes = spec.size_bytes
        return digest

    # -- the swarm --

    def _start_refresher(self) -> threading.Event | None:
        """Ask for the model's peers twice a second while files download (swarm)."""
        if self._board is None or self._refresh_peers is None:
            return None
        done = threading.Event()
        refresh = self._refresh_peers

        def loop() -> None:
            while not done.wait(0.5) and not self._stop.is_set():
                try:
                    peers = list(refresh())
                except Exception as exc:  # noqa: BLE001 - the last list stays
                    logger.debug("%s: peers not refreshed: %s", self.model_id, exc)
                    continue
                with self._lock:
                    self._peers = peers

        threading.Thread(target=loop, name=f"peers:{self.model_id}", daemon=True).start()
        return done

    def _swarm_peers(self) -> list[PeerSource]:
        with self._lock:
            return [p for p in self._peers if p.node_id not in self._excluded]

    def _fetch_swarm(self, file: _FileProgress, part: Path) -> str:
        """Fetch ``file`` piece by piece from the swarm and the hub, hashing the whole file
        as it fills (:mod:`llmlb.node.models.swarm`); returns its streamed sha256."""
        assert self._board is not None and self._peer_token is not None
        spec = file.spec
        try:
            probe = self._http.probe(spec.url, self.model_id)
        except (Transient, DownloadError) as exc:
            name = spec.filename
            logger.info("%s: %s: the hub is unreachable (%s); peers only", self.model_id, name, exc)
            probe = None
        if probe is not None and probe.size is not None and probe.size != spec.size_bytes:
            raise Corrupt(
                f"{spec.filename}: the hub serves {probe.size} bytes, the manifest says "
                f"{spec.size_bytes}"
            )
        if probe is not None and not probe.ranges:  # a hub without ranges: no pieces, then
            digest = self._fetch_stream(file, probe.url, part)
            file.hub_bytes = spec.size_bytes
            return digest
        hub = None
        if probe is not None:
            hub = HubSource(probe.url, self._http.headers_for(probe.url))
        piece_size = self.options.piece_size
        entry = self._board.open(
            self.model_id, spec.filename, spec.size_bytes, piece_size, self.manifest.revision, part
        )
        hasher = FollowingHasher(part, spec.size_bytes)
        hasher.start()

        def on_piece(source: str, n: int) -> None:
            with self._lock:
                if source == "hub":
                    file.hub_bytes += n
                else:
                    peer_bytes = file.peer_bytes if file.peer_bytes is not None else {}
                    peer_bytes[source] = peer_bytes.get(source, 0) + n
                    file.peer_bytes = peer_bytes
            self._advance(file, n)
            hasher.poke()
            if self._on_piece is not None:
                self._on_piece(source, n)

        def bad(peer: PeerSource, reason: str) -> None:
            if self._on_bad_peer is not None:
                self._on_bad_peer(peer, reason)

        swarm = SwarmFile(
            entry,
            self._board,
            hub=hub,
            peers=self._swarm_peers,
            token=self._peer_token,
            me=self._node_id,
            excluded=self._excluded,
            on_bad_peer=bad,
            on_piece=on_piece,
            stop=self._stop,
            lanes=max(1, min(self._connections, 32)),
            hub_lanes=max(1, min(self._connections, 16)),
            timeout=self.options.timeout_s,
        )
        started = time.monotonic()
        try:
            by_source = swarm.run()
        except BaseException:
            hasher.abort()
            hasher.join()
            self._board.drop(self.model_id, spec.filename)
            raise
        transferred = time.monotonic()
        self._landed_at(transferred)
        if spec.size_bytes - hasher.hashed > AHEAD_MIN_TAIL:  # else the hash ends first
            self._land(spec, part)
        digest = hasher.finish()
        logger.info(
            "%s: %s: %.1f MiB in %.3fs (hub %.1f MiB, peers %s), hash tail %.3fs",
            self.model_id,
            spec.filename,
            spec.size_bytes / MIB,
            transferred - started,
            by_source.get("hub", 0) / MIB,
            {k: round(v / MIB, 1) for k, v in by_source.items() if k != "hub"},
            time.monotonic() - transferred,
        )
        self._advance(file, spec.size_bytes - file.done)
        return digest

    # -- peers --

    def _pick_peer(self) -> PeerSource | None:
        """The least busy peer not excluded (its files in flight here count), or ``None``."""
        with self._lock:
            usable = [p for p in self._peers if p.node_id not in self._excluded]
            if not usable:
                return None
            peer = min(usable, key=lambda p: p.uploads + self._peer_files.get(p.node_id, 0))
            self._peer_files[peer.node_id] = self._peer_files.get(peer.node_id, 0) + 1
            return peer

    def _release_peer(self, peer: PeerSource | None) -> None:
        if peer is not None:
            with self._lock:
                self._peer_files[peer.node_id] -= 1

    def _blame(self, file: _FileProgress, reason: str) -> list[str]:
        """Exclude and report the peers that supplied bytes of a file that failed its check."""
        blamed = [node_id for node_id, n in (file.peer_bytes or {}).items() if n > 0]
        for node_id in blamed:
            with self._lock:
                self._excluded.add(node_id)
            peer = next(p for p in self._peers if p.node_id == node_id)
            if self._on_bad_peer is not None:
                try:
                    self._on_bad_peer(peer, f"{file.spec.filename}: {reason}")
                except Exception as exc:  # noqa: BLE001 - reporting is best effort
                    logger.warning("%s: reporting peer %s failed: %s", self.model_id, node_id, exc)
        return blamed

    def _fetch_sources(self, file: _FileProgress, peer: PeerSource, probe: Any, part: Path) -> str:
        """Fetch ``file``'s ranges from ``peer``, the hub joining when the peer is gone or slow."""
        spec = file.spec
        opts = self.options
        sources = [
            {
                "url": peer_file_url(peer, self.model_id, spec.filename),
                "headers": {"Authorization": f"Bearer {self._peer_token}"},
                "connections": opts.peer_connections,
                "role": "peer",
            }
        ]
        if probe is not None and probe.ranges:
            sources.append(
                {
                    "url": probe.url,
                    "headers": self._http.headers_for(probe.url),
                    "connections": max(1, min(self._connections, 16)),
                    "role": "hub",
                }
            )
        job = {
            "kind": "sources",
            "path": str(part),
            "size": spec.size_bytes,
            "chunk_size": chunk_size_for(spec.size_bytes, opts.peer_connections),
            "sources": sources,
            "hub_after_s": opts.peer_hub_after_s,
            "min_peer_rate": opts.peer_min_rate,
            "timeout_s": opts.timeout_s,
        }
        try:
            digest, result = self._transfer(file, job, part)
        except Transient as exc:
            for summary in exc.detail or ():
                if summary.get("role") == "peer" and summary.get("dead"):
                    with self._lock:
                        self._excluded.add(peer.node_id)  # gone: not asked again this time
            raise
        for summary in result.get("sources") or ():
            if summary["role"] == "peer":
                file.peer_bytes = {peer.node_id: int(summary["bytes"])}
                if summary.get("dead"):
                    with self._lock:
                        self._excluded.add(peer.node_id)
            else:
                file.hub_bytes += int(summary["bytes"])
        logger.info(
            "%s: %s: %.1f MiB from peer %s, %.1f MiB from the hub",
            self.model_id,
            spec.filename,
            sum((file.peer_bytes or {}).values()) / MIB,
            peer.node_id,
            file.hub_bytes / MIB,
        )
        return digest

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
            raise Corrupt(f"{spec.filename}: size {size} != expected {spec.size_bytes}")
        transferred = time.monotonic()
        self._landed_at(transferred)
        self._land(spec, part)
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
        return digest, result

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
