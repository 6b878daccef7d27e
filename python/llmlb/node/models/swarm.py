"""Swarm download of one file: pieces from the fleet's nodes while they download it too, the
hub for what no node has (:class:`SwarmFile`).

Each peer's piece map (:mod:`.pieces`) is polled by a thread of its own
(``GET /v0/peer/pieces/…``, every ``poll_s``), so a peer that is slow to answer or
unreachable delays only its own map. Lanes (threads, one connection each) take the next
piece:

1. **From a peer**, when some peer holds a missing piece with a known hash: the rarest such
   piece first (fewest holders; lowest index among equals, so the whole-file hash that
   follows the written prefix keeps up), from the least busy holder (fewest of this node's
   requests in flight to it, then fewest uploads it reports), at most ``per_peer`` requests
   in flight to one peer. The hash is the one most holders publish; every piece taken from
   a peer is checked against it. A peer whose piece fails is excluded for the model,
   reported (``on_bad_peer``) and the piece is fetched elsewhere.
2. **From the hub**, a piece no peer holds that this node owns: the pieces are shared out
   among the swarm's members (this node, the peers whose maps show this file, and the nodes
   that asked for this node's map of it in the last 3 s) by rendezvous hashing of
   (node id, piece), so nodes that start together take different pieces from the hub without
   talking, and a member that leaves hands its share to the others. Lowest index first; this
   node hashes the piece and publishes hash and piece at once.
   The hub waits for the first answer of every listed peer's map (at most ``grace_s``), so
   pieces peers hold are not fetched from the hub before their maps are known.
   Hub connections ramp up (one, then one more per piece that lands from the hub), so
   nodes that start together see each other's claims before they take many pieces.
3. When a lane has found nothing to do for ``idle_hub_s``, it takes from the hub a missing
   piece no peer holds that has been left to others for longer than ``patience`` times this
   node's rank in the piece's rendezvous order (``patience``: three times what a hub piece
   takes in this swarm, here or as the peers' maps show, plus ``idle_hub_s``): its owner is
   slow, gone, or sees the swarm otherwise, and the next in line steps in first. Pieces no
   other node is fetching go first.

Nothing here decides that the file is good: the caller verifies the whole file's SHA-256.

The choice of the next piece (1-3 above) is :class:`~.swarm_choice.PieceChoice`, which
:class:`SwarmFile` builds on; this module runs the map pollers and the lanes.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from llmlb.node.models.download.signals import Transient
from llmlb.node.models.download.sources import SourceFailed, read_range
from llmlb.node.models.pieces import PieceBoard, PieceFile, decode_bits, piece_span
from llmlb.node.models.swarm_choice import HUB, PieceChoice, _Peer
from llmlb.protocol import PeerSource

logger = logging.getLogger(__name__)

MAX_HUB_FAILURES = 8  # in a row, before the hub is given up for this attempt
MAX_PEER_FAILURES = 3  # in a row, before a peer is given up for this file


def peer_url(base: str, kind: str, model_id: str, filename: str) -> str:
    """``{base}/v0/peer/{kind}/{quoted model id}/{quoted filename}``."""
    quoted_id = urllib.parse.quote(model_id, safe="")
    return f"{base.rstrip('/')}/v0/peer/{kind}/{quoted_id}/{urllib.parse.quote(filename)}"


@dataclass
class HubSource:
    """Where the hub serves the file (redirects already resolved) and the headers to send."""

    url: str
    headers: dict[str, str]


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname or "", parts.port, timeout=timeout)


def _target(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class SwarmFile(PieceChoice):
    """Fetch one file's pieces into ``entry.path`` from the swarm and the hub.

    Args:
        entry: the file's board entry (opened for this attempt; pieces are recorded in it).
        board: the node's piece board.
        hub: the hub's URL for the file (``None``: the hub is unreachable, peers only).
        peers: returns the current peers (the router's list, refreshed by the caller).
        token: the fleet credential presented to peers.
        me: this node's id (draws the hub order's offset).
        excluded: node ids not to ask (bad for this model); shared with the caller, grown
            here when a peer's piece fails.
        on_bad_peer: called with a peer whose piece failed its hash, and the reason (once
            per peer and file).
        on_piece: called with the source (``"hub"`` or a node id) and the bytes of each
            verified piece.
        stop: set to abort.
        lanes: connections at once (all sources).
        hub_lanes: of which at most this many to the hub, shared out among the swarm's
            members (each takes ``hub_lanes / members``, at least 2), so a site keeps about
            this many connections to the hub whatever its size, and the last pieces to come
            from a congested uplink are few.
        timeout: socket timeout of every request.
        poll_s: how often a peer's map is asked for.
        idle_hub_s: a lane idle this long takes any missing piece from the hub.
        per_peer: requests in flight to one peer at most.
        grace_s: the hub waits at most this long for the listed peers' first maps.
        follow: for a URL the hub redirects a piece to, the headers to send there, or
            ``None`` when its host is not allowed (no redirect is followed without it).
    """

    def __init__(
        self,
        entry: PieceFile,
        board: PieceBoard,
        *,
        hub: HubSource | None,
        peers: Callable[[], Sequence[PeerSource]],
        token: str,
        me: str,
        excluded: set[str],
        on_bad_peer: Callable[[PeerSource, str], None],
        on_piece: Callable[[str, int], None],
        stop: threading.Event,
        lanes: int = 16,
        hub_lanes: int = 16,
        timeout: float = 30.0,
        poll_s: float = 0.2,
        idle_hub_s: float = 1.0,
        per_peer: int = 4,
        grace_s: float = 1.0,
        follow: Callable[[str], dict[str, str] | None] | None = None,
    ):
        self.entry, self.board = entry, board
        self.hub = hub
        self._list_peers = peers
        self.token = token
        self.excluded = excluded
        self.on_bad_peer, self.on_piece = on_bad_peer, on_piece
        self.stop = stop
        self.lanes, self.hub_lanes = max(1, lanes), max(1, hub_lanes)
        self.timeout, self.poll_s, self.idle_hub_s = timeout, poll_s, idle_hub_s
        self.per_peer = max(1, per_peer)
        self.follow = follow
        self._created = time.monotonic()
        self._grace_until = self._created + grace_s
        n = entry.count
        self.me = me
        self._owners: tuple[tuple[str, ...], list[tuple[str, ...]]] = ((), [])
        self._peers: dict[str, _Peer] = {}
        self._inflight: dict[int, str] = {}  # piece -> source fetching it
        self._have = [False] * n
        self._missing = n
        self._hub_inflight = 0
        self._hub_landed = 0
        self._hub_piece_s = 0.0  # moving average of hub piece times (here and at peers)
        self._hub_samples = 0
        self._waiting_since: dict[int, float] = {}  # piece -> first seen left to others
        self._hub_failures = 0
        self._hub_dead = hub is None
        self._error: str | None = None
        self._hub_error: str | None = None
        self.refused: str | None = None  # a redirect of the hub's to a host not allowed
        self._stall_since = 0.0
        self._cond = threading.Condition()
        self._done = threading.Event()
        self.by_source: dict[str, int] = {}
        self._fd = -1

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        """Fetch every piece; returns the bytes by source (``"hub"``, node ids).

        Raises:
            Transient: no source is left for a missing piece (the caller retries).
        """
        entry = self.entry
        self._fd = os.open(entry.path, os.O_WRONLY | os.O_CREAT, 0o644)
        pollers: dict[str, threading.Thread] = {}
        try:
            if self._missing == 0:
                return self.by_source
            self._grace_until += time.monotonic() - self._created
            self._watch_peers(pollers)  # the maps first: the hub waits a moment for them
            lanes = [
                threading.Thread(target=self._lane, name=f"swarm:{entry.filename}", daemon=True)
                for _ in range(self.lanes)
            ]
            for lane in lanes:
                lane.start()
            while not self._done.is_set():
                self._watch_peers(pollers)
                self._done.wait(self.poll_s)
                if self.stop.is_set():
                    self._finish()
            for lane in lanes:
                lane.join()
        finally:
            self._finish()
            os.close(self._fd)
        if self.stop.is_set() and self._missing:
            raise Transient(f"{entry.filename}: stopped")
        if self._missing:
            raise Transient(f"{entry.filename}: {self._error or 'no source left'}")
        return self.by_source

    def _finish(self) -> None:
        with self._cond:
            self._done.set()
            self._cond.notify_all()

    def _watch_peers(self, pollers: dict[str, threading.Thread]) -> None:
        """Start a map poller for every peer that is new (the caller refreshes the list)."""
        for source in self._list_peers():
            if source.node_id in pollers or source.node_id in self.excluded:
                continue
            with self._cond:
                self._peers[source.node_id] = peer = _Peer(source, uploads=source.uploads)
            thread = threading.Thread(
                target=self._poll, args=(peer,), name=f"map:{source.node_id}", daemon=True
            )
            pollers[source.node_id] = thread
            thread.start()

    # -- peers' maps --------------------------------------------------------------------------

    def _poll(self, peer: _Peer) -> None:
        entry = self.entry
        url = peer_url(peer.source.url, "pieces", entry.model_id, entry.filename)
        headers = {"Authorization": f"Bearer {self.token}", "X-Llmlb-Node-Id": self.me}
        conn: http.client.HTTPConnection | None = None
        wait = self.poll_s
        while not self._done.is_set() and not peer.dead:
            if peer.node_id in self.excluded:
                self._drop_peer(peer)
                break
            query = f"?since={peer.seq}" if peer.epoch is not None else ""
            try:
                if conn is None:
                    conn = _connect(url, self.timeout)
                conn.request("GET", _target(url) + query, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status in (401, 403):
                    self._drop_peer(peer)
                    break
                wait = self.poll_s
                if resp.status == 200:
                    self._update(peer, orjson.loads(body))
                else:  # 404: not (yet) fetching this file; 429/503: busy
                    with self._cond:
                        peer.member, peer.have = False, []
                    wait = max(self.poll_s, 0.5)
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as exc:
                if conn is not None:
                    conn.close()
                    conn = None
                logger.debug("%s: map of peer %s: %s", entry.filename, peer.node_id, exc)
                with self._cond:
                    peer.have = []  # nothing is taken from a peer we cannot hear from
                    peer.member = False
                wait = min(5.0, max(1.0, wait * 2))
            if not peer.heard:
                with self._cond:
                    peer.heard = True
                    self._cond.notify_all()
            self._done.wait(wait)
        if conn is not None:
            conn.close()

    def _update(self, peer: _Peer, data: dict) -> None:
        entry = self.entry
        if (
            int(data["size"]) != entry.size
            or int(data["piece_size"]) != entry.piece_size
            or (entry.revision and data.get("revision") and data["revision"] != entry.revision)
        ):
            with self._cond:
                peer.have, peer.member = [], False  # another file, or cut otherwise
            return
        have = decode_bits(str(data["have"]), entry.count)
        hashes = {int(i): str(h) for i, h in (data.get("hashes") or {}).items()}
        if any(not 0 <= i < entry.count or len(h) != 64 for i, h in hashes.items()):
            raise ValueError("piece hash out of range")
        with self._cond:
            if data.get("epoch") != peer.epoch:
                peer.epoch, peer.hashes = str(data.get("epoch")), {}
            peer.hashes.update(hashes)
            peer.seq = int(data["seq"])
            peer.have = have
            peer.hub = {int(i) for i in data.get("hub") or ()}
            peer.member = True
            now = time.monotonic()
            for index in peer.hub:
                peer.claims.setdefault(index, now)
            for index in [i for i in peer.claims if i not in peer.hub]:
                began = peer.claims.pop(index)
                if have[index]:  # landed there: how long a hub piece takes in this swarm
                    self._hub_time(now - began, index)
            peer.uploads = int(data.get("uploads") or 0)
            self._cond.notify_all()

    def _drop_peer(self, peer: _Peer) -> None:
        with self._cond:
            peer.dead = True
            peer.have = []
            self._cond.notify_all()


    # -- fetching ---------------------------------------------------------------------------

    def _lane(self) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        buf = bytearray(self.entry.piece_size)
        idle = [0.0]
        try:
            while (job := self._next(idle)) is not None:
                index, peer, digest = job
                url, headers = self._where(peer)
                start, end = piece_span(index, self.entry.size, self.entry.piece_size)
                try:
                    began = time.monotonic()
                    view = self._get(conns, url, headers, start, end, buf)
                    got = hashlib.sha256(view).hexdigest()
                    if peer is not None and got != digest:
                        self._lied(peer, index, got, digest)
                        continue
                    written = 0
                    while written < len(view):
                        written += os.pwrite(self._fd, view[written:], start + written)
                except (SourceFailed, OSError, http.client.HTTPException) as exc:
                    conn = conns.pop(url, None)
                    if conn is not None:
                        conn.close()
                    self._failed(index, peer, exc)
                    continue
                self.board.landed(self.entry, index, got)
                self._landed(index, peer, end - start, time.monotonic() - began)
        finally:
            for conn in conns.values():
                conn.close()

    def _where(self, peer: _Peer | None) -> tuple[str, dict[str, str]]:
        if peer is None:
            assert self.hub is not None
            return self.hub.url, self.hub.headers
        entry = self.entry
        url = peer_url(peer.source.url, "files", entry.model_id, entry.filename)
        return url, {"Authorization": f"Bearer {self.token}"}

    def _get(
        self,
        conns: dict[str, http.client.HTTPConnection],
        url: str,
        headers: dict[str, str],
        start: int,
        end: int,
        buf: bytearray,
    ) -> memoryview:
        conn = conns.get(url)
        if conn is None:
            conn = conns[url] = _connect(url, self.timeout)
        conn.request("GET", _target(url), headers={**headers, "Range": f"bytes={start}-{end - 1}"})
        resp = conn.getresponse()
        if resp.status != 206:
            resp.read()
            location = resp.getheader("Location")
            if 300 <= resp.status < 400 and location and url == getattr(self.hub, "url", None):
                self._redirected(urllib.parse.urljoin(url, location))
                raise SourceFailed(f"HTTP {resp.status} to {location} for bytes {start}-{end - 1}")
            fatal = resp.status in (400, 401, 403, 410) or 300 <= resp.status < 400
            raise SourceFailed(f"HTTP {resp.status} for bytes {start}-{end - 1}", fatal=fatal)
        return read_range(resp, buf, start, end, self.entry.size, wrong_range_fatal=False)

    def _redirected(self, url: str) -> None:
        """The hub sent a piece elsewhere: follow when the host is allowed (its headers then,
        the hub token only for allowlisted hosts), else give the hub up (:attr:`refused`)."""
        with self._cond:
            if self.follow is not None and self.follow(url) is not None:
                self.hub = HubSource(url, self.follow(url) or {})
                return
            self.refused = url
            self._hub_dead = True
            self._error = f"the hub redirected to {url}, a host not allowed"
            self._cond.notify_all()

    def _landed(self, index: int, peer: _Peer | None, n: int, seconds: float) -> None:
        source = HUB if peer is None else peer.node_id
        with self._cond:
            self._inflight.pop(index, None)
            if peer is None:
                self._hub_inflight -= 1
                self._hub_failures = 0
                self._hub_landed += 1
                self._hub_time(seconds, index)
            else:
                peer.inflight -= 1
                peer.failures = 0
            if not self._have[index]:
                self._have[index] = True
                self._missing -= 1
            self.by_source[source] = self.by_source.get(source, 0) + n
            if self._missing == 0:
                self._done.set()
            self._cond.notify_all()
        self.on_piece(source, n)

    def _failed(self, index: int, peer: _Peer | None, exc: BaseException) -> None:
        fatal = getattr(exc, "fatal", False)
        with self._cond:
            self._inflight.pop(index, None)
            if peer is None:
                self.board.claim(self.entry, index, False)
                self._hub_inflight -= 1
                self._hub_failures += 1
                if fatal or self._hub_failures >= MAX_HUB_FAILURES:
                    self._hub_dead = True
                    self._error = f"the hub: {exc}"
                self._hub_error = str(exc)
                pause = 0.1 * self._hub_failures
            else:
                peer.inflight -= 1
                peer.failures += 1
                peer.resting_until = time.monotonic() + 1.0
                if fatal or peer.failures >= MAX_PEER_FAILURES or isinstance(exc, OSError):
                    peer.dead = True  # unreachable or refusing: not asked again for this file
                pause = 0.0
            self._cond.notify_all()
        where = HUB if peer is None else f"peer {peer.node_id}"
        logger.info("%s: piece %d from %s: %s", self.entry.filename, index, where, exc)
        if pause:
            self.stop.wait(pause)

    def _lied(self, peer: _Peer, index: int, got: str, expected: str | None) -> None:
        reason = f"{self.entry.filename}: piece {index} sha256 {got} != published {expected}"
        with self._cond:
            self._inflight.pop(index, None)
            peer.inflight -= 1
            first = not peer.dead or peer.node_id not in self.excluded
            peer.dead = True
            peer.have = []
            self.excluded.add(peer.node_id)
            self._cond.notify_all()
        model = self.entry.model_id
        logger.warning("%s: peer %s sent a wrong piece: %s", model, peer.node_id, reason)
        if not first:  # its other pieces in flight: reported once
            return
        try:
            self.on_bad_peer(peer.source, reason)
        except Exception as exc:  # noqa: BLE001 - reporting is best effort
            logger.warning("reporting peer %s failed: %s", peer.node_id, exc)
