"""One prefix index for all the workers of one router (``llmlb router --workers N``).

A node posts each cache report to its router once, and the report lands on whichever worker
accepted the connection. The worker that applies it passes it on to its siblings over Unix
datagram sockets in a private directory the router's main process creates
(:data:`BUS_DIR_ENV`, mode 0700: ``<pid>.sock`` per worker), so every worker's index follows
every node's reports.

Order: a worker passes a report on before it answers the node, and the node posts its next
report only after that answer, so the passed-on datagram already waits in every sibling's
socket when the next report reaches one of them; :meth:`IndexBus.drain` before applying a
direct report keeps the order exact. A datagram that could not be delivered (a sibling's
buffer full, a worker restarted) shows as a gap in ``seq`` at that sibling, which forgets the
node and asks every worker to answer the node's next delta with 409 ``cache_resync``; the
snapshot the node then sends reaches everyone.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import orjson

from llmlb.prefix_keys import CacheReport
from llmlb.router.proxy.prefix_index import PrefixIndex, ReportResult

logger = logging.getLogger(__name__)

#: The directory the router's main process made for its workers' sockets.
BUS_DIR_ENV = "LLMLB_INDEX_BUS_DIR"
# Room for the largest report (16,384 keys packed: 88 KB) several times over.
SOCKET_BUFFER_BYTES = 1 << 20
_RECV_BYTES = 1 << 18
# A datagram this large must go through, or the bus stays off (some systems cap datagrams
# at a few KB: a bus that drops every large report would only make workers ask for resyncs).
PROBE_BYTES = 96 * 1024


class IndexBus:
    """This worker's end of the bus: passes applied reports on, applies its siblings'.

    Args:
        directory: the bus directory (:data:`BUS_DIR_ENV`).
        index: this worker's prefix index.
        name: this worker's socket name (default its pid).
    """

    def __init__(self, directory: Path, index: PrefixIndex, name: str | None = None) -> None:
        self.directory = directory
        self.index = index
        self.path = directory / f"{name or os.getpid()}.sock"
        self.dropped = 0  # datagrams a sibling could not take
        self._resync: set[str] = set()  # nodes whose next delta gets 409 cache_resync
        self._sock: socket.socket | None = None

    def start(self, probe_bytes: int = PROBE_BYTES) -> bool:
        """Bind this worker's socket and apply what siblings send, on the running loop;
        ``False`` (and a warning: each worker keeps its own index) when this system cannot
        carry a ``probe_bytes`` datagram or the socket cannot be made."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            sock.bind(str(self.path))
            sock.sendto(bytes(probe_bytes), str(self.path))
            sock.recv(probe_bytes)
        except OSError as exc:
            logger.warning("index bus off (each worker keeps its own prefix index): %s", exc)
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return False
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self.drain)
        return True

    def close(self) -> None:
        """Stop listening and remove this worker's socket."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- the route's side ----------------------------------------------------------------

    def take_resync(self, node_id: str) -> bool:
        """Whether a sibling lost ``node_id``'s reports: its next delta must be refused with
        409 ``cache_resync`` (asked once)."""
        if node_id in self._resync:
            self._resync.discard(node_id)
            return True
        return False

    def applied(self, node_id: str, report: CacheReport) -> None:
        """``report`` was applied here: pass it on to every sibling."""
        if report.snapshot:
            self._resync.discard(node_id)
        self._send({"node": node_id, "report": _packed(report)})

    # -- siblings' messages --------------------------------------------------------------

    def drain(self) -> None:
        """Apply every message waiting on this worker's socket."""
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("index bus: %s", exc)
                return
            try:
                self._apply(orjson.loads(data))
            except Exception as exc:  # noqa: BLE001 - one bad datagram costs only itself
                logger.warning("index bus: a message could not be applied: %s", exc)

    def _apply(self, message: dict[str, Any]) -> None:
        node_id = message["node"]
        if "resync" in message:
            self._resync.add(node_id)
            return
        report = _unpacked(message["report"])
        if report.snapshot:
            self._resync.discard(node_id)
        if self.index.apply(node_id, report) is ReportResult.RESYNC:
            # A message of ours went missing: every worker refuses the node's next delta,
            # and the snapshot that follows reaches us through whichever worker takes it.
            self._resync.add(node_id)
            self._send({"node": node_id, "resync": True})

    def _send(self, message: dict[str, Any]) -> None:
        sock = self._sock
        if sock is None:
            return
        data = orjson.dumps(message)
        for path in self.directory.glob("*.sock"):
            if path == self.path:
                continue
            try:
                sock.sendto(data, str(path))
            except (ConnectionRefusedError, FileNotFoundError):  # a worker that is gone
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            except OSError:  # full buffer: the sibling sees a gap and asks for a snapshot
                self.dropped += 1


def _packed(report: CacheReport) -> dict[str, Any]:
    def pack(part: dict[str, list[int]]) -> dict[str, str]:
        return {m: base64.b64encode(array.array("I", keys).tobytes()).decode() for m, keys in
                part.items()}  # fmt: skip

    return {
        "epoch": report.epoch,
        "seq": report.seq,
        "snapshot": report.snapshot,
        "stored": pack(report.stored),
        "removed": pack(report.removed),
    }


def _unpacked(data: dict[str, Any]) -> CacheReport:
    def unpack(part: dict[str, str]) -> dict[str, list[int]]:
        out = {}
        for model, packed in part.items():
            keys = array.array("I")
            keys.frombytes(base64.b64decode(packed))
            out[model] = keys.tolist()
        return out

    return CacheReport(
        data["epoch"], data["seq"], data["snapshot"], unpack(data["stored"]),
        unpack(data["removed"]),
    )  # fmt: skip


def from_environment(index: PrefixIndex) -> IndexBus | None:
    """The bus of this worker when the router runs several (:data:`BUS_DIR_ENV` set)."""
    directory = os.environ.get(BUS_DIR_ENV)
    return IndexBus(Path(directory), index) if directory else None
