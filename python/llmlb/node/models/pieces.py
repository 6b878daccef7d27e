"""Pieces: the fixed-size parts a file is traded in between the nodes of a fleet while they
download it (:mod:`.swarm`), and the board of pieces this node holds.

A file of ``size`` bytes is cut into pieces of ``piece_size`` bytes (the last one shorter).
Each piece's SHA-256 is computed by the node that received it from the hub, published with
the piece in that node's piece map, and checked by every node that takes the piece from a
peer; whoever holds a verified piece publishes the same hash. The whole file's SHA-256 (the
hub's LFS metadata, in the router's manifest) still decides whether the file is promoted.

The :class:`PieceBoard` is shared by the node's downloads (which record pieces as they land)
and its peer route (which serves only pieces recorded here, and publishes the map). A map,
``GET /v0/peer/pieces/{model_id}/{filename}?since=SEQ``, is a JSON object (:meth:`PieceFile.map`):

- ``size``, ``piece_size``, ``revision`` (the manifest revision the file belongs to);
- ``epoch``: changes whenever the node starts the file over (hashes from another epoch are
  void), ``seq``: counts the pieces recorded in this epoch;
- ``have``: base64 of a bitfield, bit ``i`` (most significant bit first) set when piece ``i``
  is on disk and verified;
- ``hashes``: ``{index: sha256}`` of the pieces recorded after ``since`` (all of them
  without it), so a poller fetches each hash once;
- ``hub``: indices this node is fetching from the hub right now (others leave them be);
- ``complete``: the whole file is verified (promoted); ``uploads``: transfers it serves now.

A request may name its node (``X-Llmlb-Node-Id``): a node that asks for a file's map is
fetching it too, and counts as a member of the file's swarm when the hub's pieces are
shared out (:mod:`.swarm`), before the router lists it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
#: Default piece size. Behind a congested uplink every hub connection moves its piece
#: slowly, and the pieces in flight (connections x piece size) land together at the end:
#: with 4 MiB pieces and 32 connections that was 128 MiB, seconds after the hub's last byte;
#: 1 MiB keeps it near 16 MiB while a request's overhead (a round trip, a map entry of 70
#: bytes, ~1 ms of CPU) stays small beside a piece (bench/README.md, Fleet).
PIECE_SIZE = 1 * MIB


def piece_count(size: int, piece_size: int) -> int:
    """How many pieces a file of ``size`` bytes has."""
    return max(0, -(-size // piece_size))


def piece_span(index: int, size: int, piece_size: int) -> tuple[int, int]:
    """``(start, end_exclusive)`` of piece ``index``."""
    start = index * piece_size
    return start, min(start + piece_size, size)


def encode_bits(bits: bytearray | list[bool]) -> str:
    """Base64 of a bitfield, bit ``i`` most significant first."""
    out = bytearray(-(-len(bits) // 8))
    for i, bit in enumerate(bits):
        if bit:
            out[i >> 3] |= 0x80 >> (i & 7)
    return base64.b64encode(bytes(out)).decode()


def decode_bits(text: str, count: int) -> list[bool]:
    """The ``count`` bits of :func:`encode_bits`' output (``ValueError`` when malformed)."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != -(-count // 8):
        raise ValueError(f"bitfield of {len(raw)} bytes for {count} pieces")
    return [bool(raw[i >> 3] & (0x80 >> (i & 7))) for i in range(count)]


def hash_pieces(path: Path, size: int, piece_size: int) -> list[str]:
    """SHA-256 of every piece of the file at ``path`` (blocking)."""
    hashes = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for index in range(piece_count(size, piece_size)):
            start, end = piece_span(index, size, piece_size)
            data = os.pread(fd, end - start, start)
            if len(data) != end - start:
                raise OSError(f"{path} is shorter than {size} bytes")
            hashes.append(hashlib.sha256(data).hexdigest())
    finally:
        os.close(fd)
    return hashes


@dataclass
class PieceFile:
    """The pieces of one file this node holds (verified, on disk at :attr:`path`)."""

    model_id: str
    filename: str
    size: int
    piece_size: int
    revision: str | None
    path: Path
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    hashes: list[str | None] = field(default_factory=list)
    have: bytearray = field(default_factory=bytearray)
    stamps: list[int] = field(default_factory=list)  # seq at which each piece was recorded
    hub: set[int] = field(default_factory=set)  # pieces being fetched from the hub
    seq: int = 0
    complete: bool = False
    visitors: dict[str, float] = field(default_factory=dict)  # node id -> last map request

    def __post_init__(self) -> None:
        n = piece_count(self.size, self.piece_size)
        self.hashes = [None] * n
        self.have = bytearray(n)
        self.stamps = [0] * n

    @property
    def count(self) -> int:
        """Pieces in the file."""
        return len(self.have)

    def covers(self, start: int, end: int) -> bool:
        """Whether every piece that ``[start, end)`` touches is held."""
        if start >= end or end > self.size:
            return False
        first, last = start // self.piece_size, (end - 1) // self.piece_size
        return all(self.have[first : last + 1])

    def map(self, since: int | None, uploads: int) -> dict[str, Any]:
        """The wire form of this file's piece map (hashes recorded after ``since``)."""
        floor = since if since is not None and since <= self.seq else -1
        return {
            "model_id": self.model_id,
            "filename": self.filename,
            "revision": self.revision,
            "size": self.size,
            "piece_size": self.piece_size,
            "epoch": self.epoch,
            "seq": self.seq,
            "have": encode_bits(self.have),
            "hashes": {
                str(i): h
                for i, h in enumerate(self.hashes)
                if h is not None and self.have[i] and self.stamps[i] > floor
            },
            "hub": sorted(self.hub),
            "complete": self.complete,
            "uploads": uploads,
        }


class PieceBoard:
    """The pieces this node holds of every file it downloads or has downloaded this run.

    Thread-safe: downloads record pieces from their threads, the peer route reads from the
    event loop.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[str, str], PieceFile] = {}
        self._lock = threading.Lock()

    def open(
        self,
        model_id: str,
        filename: str,
        size: int,
        piece_size: int,
        revision: str | None,
        path: Path,
    ) -> PieceFile:
        """Start (or start over) a file: no piece held, a new epoch."""
        entry = PieceFile(model_id, filename, size, piece_size, revision, path)
        with self._lock:
            self._files[(model_id, filename)] = entry
        return entry

    def get(self, model_id: str, filename: str) -> PieceFile | None:
        """The file's entry, if this node holds or fetches pieces of it."""
        with self._lock:
            return self._files.get((model_id, filename))

    def adopt(self, entry: PieceFile) -> PieceFile:
        """Record an entry built elsewhere (a verified file's, hashed by the peer route);
        an entry already there wins."""
        with self._lock:
            return self._files.setdefault((entry.model_id, entry.filename), entry)

    def landed(self, entry: PieceFile, index: int, sha256: str) -> None:
        """Piece ``index`` is on disk and verified, with this hash."""
        with self._lock:
            entry.seq += 1
            entry.hashes[index] = sha256
            entry.have[index] = 1
            entry.stamps[index] = entry.seq
            entry.hub.discard(index)

    def claim(self, entry: PieceFile, index: int, on: bool) -> None:
        """Mark (or unmark) piece ``index`` as being fetched from the hub by this node."""
        with self._lock:
            if on:
                entry.hub.add(index)
            else:
                entry.hub.discard(index)

    def moved(self, model_id: str, filename: str, path: Path, complete: bool = False) -> None:
        """The file's bytes are now at ``path`` (renamed; ``complete``: promoted)."""
        with self._lock:
            entry = self._files.get((model_id, filename))
            if entry is not None:
                entry.path = path
                entry.complete = entry.complete or complete

    def drop(self, model_id: str, filename: str | None = None) -> None:
        """Forget a file (its check failed, it was deleted), or every file of a model."""
        with self._lock:
            for key in [k for k in self._files if k[0] == model_id]:
                if filename is None or key[1] == filename:
                    del self._files[key]

    def map(
        self, entry: PieceFile, since: int | None, uploads: int, visitor: str | None = None
    ) -> dict[str, Any]:
        """:meth:`PieceFile.map` under the board's lock; ``visitor``: the asking node's id."""
        with self._lock:
            if visitor is not None and len(entry.visitors) < 1024:
                entry.visitors[visitor] = time.monotonic()
            return entry.map(since, uploads)

    def visitors(self, entry: PieceFile, within_s: float) -> list[str]:
        """Nodes that asked for ``entry``'s map in the last ``within_s`` seconds."""
        cutoff = time.monotonic() - within_s
        with self._lock:
            for node_id in [n for n, t in entry.visitors.items() if t < cutoff]:
                del entry.visitors[node_id]
            return list(entry.visitors)

    def covers(self, entry: PieceFile, start: int, end: int) -> tuple[bool, Path]:
        """Whether ``entry`` holds ``[start, end)``, and where its bytes are."""
        with self._lock:
            return entry.covers(start, end), entry.path
