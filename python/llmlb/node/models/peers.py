"""Serving this node's verified model files to the other nodes of its fleet.

``GET``/``HEAD /v0/peer/files/{model_id}/{filename}`` (``model_id`` percent-encoded as one
path segment, ``filename`` its path in the repo), with ``Range``: one ``bytes=`` range, as
RFC 9110 reads it (a last position past the end is the end; a first position at or past
the end, however many digits it has, is 416 ``range_not_satisfiable`` with
``Content-Range: bytes */<size>``); a malformed or multi-range header is ignored (the whole
file, 200), as RFC 9110 allows. Rules, each checked on every request:

- only the fleet credential the router hands to registered nodes (``peer_token``) opens it:
  no client key, no router key, no node key;
- only files of models that are in the store and valid (never ``.staging/``), that the
  router's manifest lists with a sha256, and whose bytes are known to have that sha256: from
  the record the download wrote at promotion while the file is unchanged (size, mtime,
  inode), else hashed once here (hand-placed files) and remembered while unchanged;
- while the node downloads a file (not yet promoted), only ranges that lie within pieces it
  holds verified (:mod:`.pieces`: hashed from the hub's bytes, or checked against their
  published hash) are served, from the partial file;
- every byte goes through one upload budget (``--peer-upload-mbps``, a token bucket shared by
  all uploads), and at most :data:`MAX_UPLOADS` run at once (429 beyond), so serving peers
  never starves inference.

``GET /v0/peer/pieces/{model_id}/{filename}[?since=SEQ]``: the piece map of a file this node
downloads or holds verified (:meth:`llmlb.node.models.pieces.PieceFile.map`); for a verified
file in the store that no download of this run recorded, the piece hashes are computed once
from the verified bytes. Same token and budget rules; a node with no budget answers 503.

:class:`TransferStats` keeps the per-model counters the node reports (bytes from the hub and
from peers of its downloads, uploads in progress and bytes served) and exports them as
Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from llmlb.errors import ApiError, ModelNotRegistered, invalid_api_key, model_not_found
from llmlb.http import bearer_token, error_response, model_id_or_400
from llmlb.model_storage import is_safe_relative_path
from llmlb.node.models.download.staging import file_signature, read_marker
from llmlb.node.models.hashing import sha256_file
from llmlb.node.models.pieces import PIECE_SIZE, PieceBoard, PieceFile, hash_pieces
from llmlb.prometheus import Declare

if TYPE_CHECKING:
    from llmlb.node.models.resolver import Resolver

logger = logging.getLogger(__name__)

PREFIX = "/v0/peer/files/"
PIECES_PREFIX = "/v0/peer/pieces/"
NODE_ID_HEADER = "x-llmlb-node-id"  # the node asking for a map (it fetches the file too)
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_UPLOADS = 64  # transfers (range requests) served at once
BLOCK = 1 << 20
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_MAX_POSITION_DIGITS = 18  # any longer position is past every file's end (and int() safe)


# -- counters -------------------------------------------------------------------------------


@dataclass
class _ModelCounters:
    uploads: int = 0
    bytes_served: int = 0
    bytes_from_hub: int = 0
    bytes_from_peers: int = 0
    pieces_served: int = 0
    by_source: dict[str, int] | None = None  # this run's download bytes: "hub", node ids


class TransferStats:
    """Per-model transfer counters of this node (reports) and their metrics.

    Args:
        registry: the node's Prometheus registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._models: dict[str, _ModelCounters] = {}
        self._lock = threading.Lock()
        m = Declare(registry if registry is not None else CollectorRegistry())
        self.source_bytes = m.counter(
            "llmlb_node_download_source_bytes",
            "Verified model bytes downloaded, by source (hub|peer)",
            "source",
        )
        self.served_bytes = m.counter(
            "llmlb_node_peer_served_bytes", "Model bytes served to other nodes"
        )
        self.uploads = m.gauge("llmlb_node_peer_uploads", "Transfers to other nodes in progress")
        self.refused = m.counter(
            "llmlb_node_peer_refused", "Peer requests refused, by reason", "reason"
        )
        self.bad_peers = m.counter(
            "llmlb_node_bad_peer_files",
            "Files in which a peer's bytes failed a check (a piece's published hash, or the "
            "whole file's sha256); the bytes are fetched again elsewhere",
        )
        self.model_source_bytes = m.counter(
            "llmlb_node_download_model_source_bytes",
            "Verified pieces' bytes downloaded, by model and source (hub, or a peer's node id)",
            "model",
            "source",
        )
        self.pieces_served = m.counter(
            "llmlb_node_peer_pieces_served",
            "Pieces (ranges) of a model served to other nodes",
            "model",
        )
        self.serves_peers = True  # False: no upload budget; said in every report

    def piece(self, model_id: str, source: str, n: int) -> None:
        """A verified piece of ``n`` bytes of ``model_id`` came from ``source``."""
        with self._lock:
            counters = self._of(model_id)
            if counters.by_source is None:
                counters.by_source = {}
            counters.by_source[source] = counters.by_source.get(source, 0) + n
        self.model_source_bytes.labels(model_id, source).inc(n)

    def piece_served(self, model_id: str) -> None:
        """A piece (a range) of ``model_id`` went to a peer in full."""
        with self._lock:
            self._of(model_id).pieces_served += 1
        self.pieces_served.labels(model_id).inc()

    def _of(self, model_id: str) -> _ModelCounters:
        return self._models.setdefault(model_id, _ModelCounters())

    def downloading(self, model_id: str, from_hub: int, from_peers: int) -> None:
        """Record a download's verified bytes by source so far."""
        with self._lock:
            counters = self._of(model_id)
            counters.bytes_from_hub, counters.bytes_from_peers = from_hub, from_peers

    def downloaded(self, model_id: str, from_hub: int, from_peers: int) -> None:
        """Record a finished download's bytes by source (and count them in the metrics)."""
        self.downloading(model_id, from_hub, from_peers)
        self.source_bytes.labels("hub").inc(from_hub)
        self.source_bytes.labels("peer").inc(from_peers)

    def upload_started(self, model_id: str) -> None:
        """One more transfer of ``model_id`` to a peer."""
        with self._lock:
            self._of(model_id).uploads += 1
        self.uploads.inc()

    def upload_ended(self, model_id: str) -> None:
        """A transfer of ``model_id`` to a peer ended."""
        with self._lock:
            self._of(model_id).uploads -= 1
        self.uploads.dec()

    def served(self, model_id: str, n: int) -> None:
        """``n`` bytes of ``model_id`` went to a peer."""
        with self._lock:
            self._of(model_id).bytes_served += n
        self.served_bytes.inc(n)

    def active_uploads(self) -> int:
        """Transfers to peers in progress, over all models."""
        with self._lock:
            return sum(c.uploads for c in self._models.values())

    def fields(self, model_id: str) -> dict[str, Any]:
        """The report fields of ``model_id``: counters that moved, ``bytes_by_source`` and
        ``pieces_served`` (the node's own status only; the router keeps the counters), and
        ``serves_peers: false`` when the node has no upload budget."""
        extra: dict[str, Any] = {} if self.serves_peers else {"serves_peers": False}
        with self._lock:
            counters = self._models.get(model_id)
            if counters is None:
                return extra
            data: dict[str, Any] = {
                "bytes_from_hub": counters.bytes_from_hub,
                "bytes_from_peers": counters.bytes_from_peers,
                "uploads": counters.uploads,
                "bytes_served": counters.bytes_served,
                "pieces_served": counters.pieces_served,
                "bytes_by_source": dict(counters.by_source or {}),
            }
        return {**{k: v for k, v in data.items() if v}, **extra}

    def forget(self, model_id: str) -> None:
        """Drop a deleted model's counters (its uploads, if any, still end normally)."""
        with self._lock:
            counters = self._models.get(model_id)
            if counters is not None and counters.uploads == 0:
                del self._models[model_id]


# -- the budget -------------------------------------------------------------------------------


class UploadBudget:
    """A token bucket of ``rate`` bytes/s shared by every upload (burst: 50 ms, >= 64 KiB)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.burst = max(64 * 1024, rate / 20)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def block(self) -> int:
        """Read size that keeps the budget smooth."""
        return int(min(BLOCK, max(16 * 1024, self.burst)))

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= min(n, self.burst):
                    self._tokens -= n
                    return
                await asyncio.sleep((min(n, self.burst) - self._tokens) / self.rate)


# -- verification -------------------------------------------------------------------------------


class VerifiedFiles:
    """Which store files are known to hold their manifest's sha256 (cached per signature)."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self._digests: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._hashing: dict[Path, asyncio.Future[str]] = {}

    async def digest(self, model_id: str, filename: str, path: Path) -> str:
        """The sha256 of ``path``'s current bytes (recorded at promotion, else hashed)."""
        sig = file_signature(path)
        key = (sig["size"], sig["mtime_ns"], sig["ino"])
        cached = self._digests.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        marker = read_marker(self.models_dir, model_id) or {}
        recorded = (marker.get("verified") or {}).get(filename)
        if isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in sig.items()):
            digest = str(recorded.get("sha256"))
        else:
            pending = self._hashing.get(path)
            if pending is None:
                pending = asyncio.ensure_future(asyncio.to_thread(sha256_file, path))
                self._hashing[path] = pending
                pending.add_done_callback(lambda _f: self._hashing.pop(path, None))
            digest = await asyncio.shield(pending)
            if file_signature(path) != sig:  # changed while hashed: trust nothing
                raise ApiError(409, "file_changed", f"{filename} changed while it was checked")
        self._digests[path] = (key, digest)
        return digest


# -- the route --------------------------------------------------------------------------------


def _position(digits: str, size: int) -> int:
    """A range position; any number beyond the file (however many digits) as ``size + 1``."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > _MAX_POSITION_DIGITS:
        return size + 1
    return min(int(digits), size + 1)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` of a single ``bytes=`` range; ``None`` for the whole file
    (no header, or one that is malformed: ignored, as RFC 9110 allows).

    Raises:
        ApiError: 416 ``range_not_satisfiable`` (with ``Content-Range: bytes */size``).
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        length = _position(last, size)
        if length == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return max(0, size - length), size
    start = _position(first, size)
    end = size if last == "" else min(_position(last, size) + 1, size)
    if start >= size or (last != "" and _position(last, size) < start):
        raise _unsatisfiable(header, size)
    return start, end


class _Unsatisfiable(ApiError):
    """416, with the ``Content-Range`` that tells the client the file's size."""

    def __init__(self, message: str, size: int):
        super().__init__(416, "range_not_satisfiable", message)
        self.size = size

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Content-Range": f"bytes */{self.size}"}


def _unsatisfiable(header: str, size: int) -> ApiError:
    shown = header if len(header) <= 80 else header[:77] + "..."
    return _Unsatisfiable(f"range {shown!r} is not within the file's {size} bytes", size)


class PeerService:
    """The ``/v0/peer/files`` route of one node.

    Args:
        resolver: the node's model resolution (store, manifests).
        token: returns the fleet credential the router gave this node (``None`` before).
        upload_mbps: the upload budget in megabits/s (0: serve no peer).
        stats: the node's transfer counters.
    """

    def __init__(
        self,
        resolver: Resolver,
        token: Callable[[], str | None],
        upload_mbps: float,
        stats: TransferStats,
    ):
        self.resolver = resolver
        self.token = token
        self.stats = stats
        self.budget = UploadBudget(upload_mbps * 1e6 / 8) if upload_mbps > 0 else None
        self.files = VerifiedFiles(resolver.models_dir)
        self.board: PieceBoard = resolver.board
        stats.serves_peers = self.budget is not None

    def _refuse(self, reason: str, exc: ApiError) -> ApiError:
        self.stats.refused.labels(reason).inc()
        return exc

    def _check_token(self, request: Request) -> None:
        expected = self.token()
        presented = bearer_token(request.headers.get("authorization"))
        if (
            not expected
            or presented is None
            or not hmac.compare_digest(presented, expected.encode())
        ):
            raise self._refuse(
                "auth",
                invalid_api_key("peer token of this fleet"),
            )

    def _target(self, request: Request, prefix: str = PREFIX) -> tuple[str, str]:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        path = raw.decode("latin-1").partition("?")[0]
        rest = path[len(prefix) :] if path.startswith(prefix) else ""
        quoted_id, _, quoted_name = rest.partition("/")
        model_id = model_id_or_400(unquote(quoted_id))
        filename = unquote(quoted_name)
        if not is_safe_relative_path(filename):
            raise ApiError(400, "invalid_request_error", f"unsafe filename {filename!r}")
        return model_id, filename

    async def _verified(self, model_id: str, filename: str) -> tuple[Path, int, str]:
        """The file's path, size and sha256, or the reason it is not served (404/409)."""
        resolver = self.resolver
        if resolver.local_path(model_id) is None:  # not in the store, or invalid
            raise self._refuse(
                "missing",
                model_not_found(model_id),
            )
        manifest = resolver.manifests.get(model_id)
        if manifest is None:
            try:
                manifest = await resolver.manifest(model_id)
            except ModelNotRegistered:  # e.g. an id with a quantisation the router lacks
                raise self._refuse(
                    "not_listed",
                    model_not_found(model_id),
                ) from None
            except Exception as exc:  # noqa: BLE001 - no manifest, nothing to check against
                raise self._refuse(
                    "manifest",
                    ApiError(503, "manifest_unavailable", f"{model_id}: {exc}", retry_after=5),
                ) from None
        spec = next((f for f in manifest.files if f.filename == filename), None)
        if spec is None or spec.sha256 is None:
            raise self._refuse(
                "not_listed",
                ApiError(
                    404,
                    "file_not_found",
                    f"{filename} of {model_id} is not a file the manifest pins a sha256 for",
                ),
            )
        path = resolver.store.model_dir(model_id) / filename
        if not path.is_file():
            raise self._refuse(
                "missing", ApiError(404, "file_not_found", f"{filename} of {model_id} is missing")
            )
        digest = await self.files.digest(model_id, filename, path)
        if digest != spec.sha256 or path.stat().st_size != spec.size_bytes:
            raise self._refuse(
                "unverified",
                ApiError(
                    409,
                    "file_not_verified",
                    f"{filename} of {model_id} does not match the manifest's sha256",
                ),
            )
        return path, spec.size_bytes, digest

    def _open_to_peers(self, request: Request) -> None:
        self._check_token(request)
        if self.budget is None:
            raise self._refuse(
                "disabled",
                ApiError(503, "peer_disabled", "this node serves no peers", retry_after=60),
            )

    def _partial(
        self, model_id: str, filename: str, header: str | None
    ) -> tuple[Path, int, tuple[int, int]] | None:
        """A range of a file this node is still downloading: its path, size and span, when
        every piece it touches is held verified (``None``: no such download here).

        Raises:
            ApiError: 404 ``piece_not_held`` for a range beyond the held pieces (or no range).
        """
        if self.resolver.local_path(model_id) is not None:
            return None
        entry = self.board.get(model_id, filename)
        if entry is None:
            return None
        span = _parse_range(header, entry.size)
        if span is None:
            span = (0, entry.size)
        held, path = self.board.covers(entry, *span)
        if not held:
            raise self._refuse(
                "unverified",
                ApiError(
                    404,
                    "piece_not_held",
                    f"bytes {span[0]}-{span[1] - 1} of {filename} are not all in verified "
                    "pieces on this node yet",
                ),
            )
        return path, entry.size, span

    async def handle(self, request: Request) -> Response:
        """``GET``/``HEAD /v0/peer/files/{model_id}/{filename}``."""
        digest: str | None = None
        try:
            self._open_to_peers(request)
            model_id, filename = self._target(request)
            header = request.headers.get("range")
            partial = self._partial(model_id, filename, header)
            if partial is not None:
                path, size, whole = partial
                span: tuple[int, int] | None = whole if header else None
            else:
                path, size, digest = await self._verified(model_id, filename)
                span = _parse_range(header, size)
            start, end = span if span is not None else (0, size)
            fd = os.open(path, os.O_RDONLY)  # held open: a rename meanwhile does not matter
        except ApiError as exc:
            return error_response(exc)
        except OSError:  # renamed between the check and the open (promoted): ask again
            moving = ApiError(503, "file_moving", f"{filename} is being moved", retry_after=1)
            return error_response(self._refuse("missing", moving))
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Length": str(end - start),
            "X-Linked-Size": str(size),
        }
        if digest is not None:
            headers["ETag"] = f'"{digest}"'
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if request.method == "HEAD":
            os.close(fd)
            return Response(status_code=status, headers=headers)
        if self.stats.active_uploads() >= MAX_UPLOADS:
            os.close(fd)
            busy = ApiError(429, "peer_busy", "too many peer transfers", retry_after=1)
            return error_response(self._refuse("busy", busy))
        return StreamingResponse(
            self._body(model_id, fd, start, end),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    async def _body(self, model_id: str, fd: int, start: int, end: int) -> AsyncIterator[bytes]:
        assert self.budget is not None
        self.stats.upload_started(model_id)
        try:
            offset = start
            block = self.budget.block()
            while offset < end:
                n = min(block, end - offset)
                await self.budget.take(n)
                data = await asyncio.to_thread(os.pread, fd, n, offset)
                if not data:
                    break
                offset += len(data)
                self.stats.served(model_id, len(data))
                yield data
            if offset >= end:
                self.stats.piece_served(model_id)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            self.stats.upload_ended(model_id)


    async def pieces(self, request: Request) -> Response:
        """``GET /v0/peer/pieces/{model_id}/{filename}[?since=SEQ]``: the file's piece map."""
        try:
            self._open_to_peers(request)
            model_id, filename = self._target(request, PIECES_PREFIX)
            raw_since = request.query_params.get("since")
            try:
                since = int(raw_since) if raw_since is not None else None
            except ValueError:
                raise ApiError(
                    400, "invalid_request_error", "since must be an integer", param="since"
                ) from None
            entry = await self._entry(model_id, filename)
        except ApiError as exc:
            return error_response(exc)
        visitor = request.headers.get(NODE_ID_HEADER)
        if visitor is not None and not _NODE_ID.fullmatch(visitor):
            visitor = None
        data = self.board.map(entry, since, self.stats.active_uploads(), visitor)
        return Response(orjson.dumps(data), media_type="application/json")

    async def _entry(self, model_id: str, filename: str) -> PieceFile:
        """The board's entry of a file, or one made from the verified file in the store."""
        if self.resolver.local_path(model_id) is None:
            entry = self.board.get(model_id, filename)
            if entry is None:
                raise self._refuse(
                    "missing",
                    ApiError(404, "file_not_found", f"{filename} of {model_id} is not here"),
                )
            return entry
        entry = self.board.get(model_id, filename)
        if entry is not None and entry.complete:
            return entry
        path, size, _digest = await self._verified(model_id, filename)  # whole-file check
        hashes = await asyncio.to_thread(hash_pieces, path, size, PIECE_SIZE)
        made = PieceFile(model_id, filename, size, PIECE_SIZE, None, path, complete=True)
        for index, digest in enumerate(hashes):
            made.hashes[index] = digest
            made.have[index] = 1
            made.stamps[index] = made.seq = index + 1
        made.revision = (read_marker(self.resolver.models_dir, model_id) or {}).get("revision")
        return self.board.adopt(made)


def routes(service_of: Callable[[Request], PeerService]) -> list[Any]:
    """The peer routes for a Starlette app; ``service_of`` finds the request's service."""
    from starlette.routing import Route

    async def peer_files(request: Request) -> Response:
        return await service_of(request).handle(request)

    async def peer_pieces(request: Request) -> Response:
        return await service_of(request).pieces(request)

    return [
        Route(PREFIX + "{rest:path}", peer_files, methods=["GET", "HEAD"]),
        Route(PIECES_PREFIX + "{rest:path}", peer_pieces, methods=["GET"]),
    ]
