"""Choosing a swarm download's next piece: from the rarest holder set among the peers, else
the hub piece this node owns by rendezvous hashing (or one left too long to a slow owner);
the peers' map state (:class:`_Peer`) the choice reads, and the hub's piece time it weighs.

Apart from :mod:`.swarm` (the run, the map pollers and the lanes that fetch) because it is
the swarm's policy, read under one lock; :class:`PieceChoice` is the base
:class:`~.swarm.SwarmFile` builds on.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from dataclasses import dataclass, field

from llmlb.node.models.pieces import PieceBoard, PieceFile, piece_span
from llmlb.protocol import PeerSource

HUB = "hub"


@dataclass
class _Peer:
    source: PeerSource
    epoch: str | None = None
    seq: int = -1
    have: list[bool] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)
    hub: set[int] = field(default_factory=set)
    uploads: int = 0
    inflight: int = 0
    failures: int = 0
    resting_until: float = 0.0
    dead: bool = False
    heard: bool = False  # its map answered (or failed) at least once
    member: bool = False  # its last map was of this file: it shares out the hub's pieces
    claims: dict[int, float] = field(default_factory=dict)  # hub piece -> first seen claimed

    @property
    def node_id(self) -> str:
        return self.source.node_id


def _score(filename: str, index: int, member: str) -> bytes:
    """Rendezvous score of ``member`` for piece ``index`` (the highest owns it)."""
    return hashlib.sha256(f"{member}\0{filename}\0{index}".encode()).digest()


class PieceChoice:
    """A swarm download's choice of the next piece; :class:`~.swarm.SwarmFile` sets the
    state declared here."""

    entry: PieceFile
    board: PieceBoard
    excluded: set[str]
    stop: threading.Event
    hub_lanes: int
    idle_hub_s: float
    per_peer: int
    timeout: float
    me: str
    _created: float
    _grace_until: float
    _owners: tuple[tuple[str, ...], list[tuple[str, ...]]]
    _peers: dict[str, _Peer]
    _inflight: dict[int, str]
    _have: list[bool]
    _missing: int
    _hub_inflight: int
    _hub_landed: int
    _hub_piece_s: float
    _hub_samples: int
    _waiting_since: dict[int, float]
    _hub_dead: bool
    _error: str | None
    _hub_error: str | None
    _stall_since: float
    _cond: threading.Condition
    _done: threading.Event

    def _holders(self, index: int) -> tuple[str | None, list[_Peer], int]:
        """The hash most live holders publish for ``index``, the holders that publish it and
        are not saturated, and how many publish it in all."""
        votes: dict[str, list[_Peer]] = {}
        now = time.monotonic()
        for peer in self._peers.values():
            if peer.dead or index >= len(peer.have) or not peer.have[index]:
                continue
            digest = peer.hashes.get(index)
            if digest is not None:
                votes.setdefault(digest, []).append(peer)
        if not votes:
            return None, [], 0
        digest, holders = max(votes.items(), key=lambda kv: (len(kv[1]), kv[0]))
        free = [p for p in holders if p.inflight < self.per_peer and p.resting_until <= now]
        return digest, free, len(holders)

    def _next(self, idle: list[float]) -> tuple[int, _Peer | None, str | None] | None:
        """The next ``(piece, peer or None for the hub, expected hash)``; ``None``: stop."""
        with self._cond:
            while True:
                if self._done.is_set() or self._missing == 0 or self.stop.is_set():
                    return None
                pick = self._pick_peer_piece()
                if pick is not None:
                    index, peer, digest = pick
                    self._inflight[index] = peer.node_id
                    peer.inflight += 1
                    idle[0] = 0.0
                    return index, peer, digest
                now = time.monotonic()
                waiting = now < self._grace_until and any(
                    not p.heard and not p.dead for p in self._peers.values()
                )
                share = max(2, -(-self.hub_lanes // len(self._owners[0] or (self.me,))))
                allowed = min(share, 1 + self._hub_landed)
                if not waiting and not self._hub_dead and self._hub_inflight < allowed:
                    idle[0] = idle[0] or now
                    hub_piece = self._pick_hub_piece(now - idle[0] >= self.idle_hub_s)
                    if hub_piece is not None:
                        self._inflight[hub_piece] = HUB
                        self._hub_inflight += 1
                        self.board.claim(self.entry, hub_piece, True)
                        idle[0] = 0.0
                        return hub_piece, None, None
                if self._stalled():
                    self._error = (
                        f"the hub failed ({self._hub_error or 'unreachable'}) and no peer "
                        "holds the missing pieces"
                    )
                    self._done.set()
                    self._cond.notify_all()
                    return None
                self._cond.wait(0.05)

    def _pick_peer_piece(self) -> tuple[int, _Peer, str] | None:
        best: tuple[int, int] | None = None
        choice: tuple[int, _Peer, str] | None = None
        for index, held in enumerate(self._have):
            if held or index in self._inflight:
                continue
            digest, free, count = self._holders(index)
            if digest is None or not free:
                continue
            if best is None or (count, index) < best:
                peer = min(free, key=lambda p: (p.inflight, p.uploads, p.node_id))
                best, choice = (count, index), (index, peer, digest)
        return choice

    def _rankings(self) -> list[tuple[str, ...]]:
        """Each piece's members in rendezvous order (owner first), cached per member set."""
        live = [p.node_id for p in self._peers.values() if p.member and not p.dead]
        gone = {p.node_id for p in self._peers.values() if p.dead} | self.excluded
        visitors = [v for v in self.board.visitors(self.entry, 3.0) if v not in gone]
        members = tuple(sorted({self.me, *live, *visitors}))
        if members != self._owners[0]:
            name = self.entry.filename

            rankings = [
                tuple(sorted(members, key=functools.partial(_score, name, i), reverse=True))
                for i in range(self.entry.count)
            ]
            self._owners = (members, rankings)
        return self._owners[1]

    def _pick_hub_piece(self, idle: bool) -> int | None:
        claimed: set[int] = set()
        for peer in self._peers.values():
            if not peer.dead:
                claimed |= peer.hub
        rankings = self._rankings()
        now = time.monotonic()
        patience = 3 * self._hub_piece_s + self.idle_hub_s
        if self._hub_samples == 0:  # no hub piece landed anywhere yet: they are in flight
            patience = max(patience, 3 * (now - self._created) + self.idle_hub_s)
        late: list[int] = []
        for index, held in enumerate(self._have):
            if held or index in self._inflight or self._holders(index)[0] is not None:
                continue  # a peer holds it: it comes from there
            rank = rankings[index].index(self.me)
            if rank == 0 and index not in claimed:
                return index
            # Another node's (or being fetched elsewhere): the next in the piece's ranking
            # steps in first when it stays missing, the one after that later, and so on.
            waited = now - self._waiting_since.setdefault(index, now)
            if idle and waited >= patience * max(1, rank):
                late.append(index)
        if not late:
            return None
        return min(late, key=lambda i: (i in claimed, i))

    def _hub_time(self, seconds: float, index: int) -> None:
        """Fold one hub piece's time (here, or seen in a peer's map) into the average
        (full pieces only: a short last piece says little)."""
        start, end = piece_span(index, self.entry.size, self.entry.piece_size)
        if end - start < self.entry.piece_size:
            return
        self._hub_samples += 1
        weight = 1.0 if self._hub_samples == 1 else 0.2
        self._hub_piece_s += weight * (seconds - self._hub_piece_s)

    def _stalled(self) -> bool:
        """The hub is gone, nothing is in flight and no live peer holds a missing piece: at
        once when no live peer is left, else once that lasted ``timeout``."""
        if (
            not self._hub_dead
            or self._inflight
            or any(
                not held and self._holders(i)[0] is not None for i, held in enumerate(self._have)
            )
        ):
            self._stall_since = 0.0
            return False
        if not any(not p.dead for p in self._peers.values()):
            return True
        now = time.monotonic()
        self._stall_since = self._stall_since or now
        return now - self._stall_since >= self.timeout
