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

The shared state and the byte movers are in :mod:`.fetch_core`, the peer and swarm routes in
:mod:`.peer_fetch`; :class:`ModelFetch` builds on both.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from filelock import FileLock

from llmlb.errors import (
    DownloadCancelled,
    DownloadError,
    InsufficientDiskSpace,
    IntegrityCheckFailed,
)
from llmlb.model_storage import staging_dir
from llmlb.node.models.download.fetch_core import _FileProgress
from llmlb.node.models.download.fetch_core import select_files as select_files
from llmlb.node.models.download.options import MIB, MIN_FILE_CONNECTIONS, PARALLEL_MIN_BYTES
from llmlb.node.models.download.peer_fetch import PeerFetch
from llmlb.node.models.download.signals import Corrupt, Transient
from llmlb.node.models.download.staging import (
    VERIFIED_FILENAME,
    load_verified,
    model_lock,
    promote,
    was_downloaded,
    write_json,
)
from llmlb.node.models.hashing import sha256_file
from llmlb.protocol import ManifestFile

logger = logging.getLogger(__name__)


class ModelFetch(PeerFetch):
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
