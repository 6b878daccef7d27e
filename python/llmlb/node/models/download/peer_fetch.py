"""Fetching a file from other nodes: from one peer with the hub joining when it is gone or
slow (a ``sources`` job of a transfer worker), or piece by piece from the swarm and the hub
(:mod:`llmlb.node.models.swarm`); choosing, releasing and blaming peers.

Apart from :mod:`.fetch` because it is the one part of a download that trusts other nodes
for bytes (always against a sha256), with its own bookkeeping of who served what.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from llmlb.errors import DownloadError, HostNotAllowed
from llmlb.node.models.download.fetch_core import FetchCore, _FileProgress
from llmlb.node.models.download.options import MIB, chunk_size_for
from llmlb.node.models.download.signals import Corrupt, Transient
from llmlb.node.models.hashing import FollowingHasher
from llmlb.node.models.swarm import HubSource, SwarmFile
from llmlb.protocol import PeerSource

logger = logging.getLogger("llmlb.node.models.download.fetch")  # one name for a download's log

# A swarm download's GGUF is loaded ahead of its hash only when this much is left to hash:
# pieces land out of order, and when the hash is nearly done the file is renamed before the
# load has opened it.
AHEAD_MIN_TAIL = 64 * MIB


def peer_file_url(peer: PeerSource, model_id: str, filename: str) -> str:
    """Where ``peer`` serves ``filename`` of ``model_id`` (``/v0/peer/files/{id}/{name}``)."""
    quoted_id = urllib.parse.quote(model_id, safe="")
    return f"{peer.url.rstrip('/')}/v0/peer/files/{quoted_id}/{urllib.parse.quote(filename)}"


class PeerFetch(FetchCore):
    """A download's peer and swarm routes (see :class:`~.fetch.ModelFetch`)."""

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

    def _follow(self, url: str) -> dict[str, str] | None:
        """Headers for a hub redirect's target, or ``None`` when its host is not allowed."""
        try:
            self._http.check(url, self.model_id)
        except HostNotAllowed:
            return None
        return self._http.headers_for(url)

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
            if not self._swarm_peers():
                raise  # nobody else to ask: the hub's own reason
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
            follow=self._follow,
        )
        started = time.monotonic()
        try:
            by_source = swarm.run()
        except BaseException:
            hasher.abort()
            hasher.join()
            self._board.drop(self.model_id, spec.filename)
            if swarm.refused is not None:
                raise self._redirect_refused(spec, swarm.refused) from None
            raise
        transferred = time.monotonic()
        self._landed_at(transferred)
        if spec.size_bytes - hasher.hashed > AHEAD_MIN_TAIL:  # else the hash ends first
            self._land(spec, part)
        peers = {k: round(v / MIB, 1) for k, v in by_source.items() if k != "hub"}
        sources = f" (hub {by_source.get('hub', 0) / MIB:.1f} MiB, peers {peers})"
        return self._hashed(file, hasher, started, transferred, sources)

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
