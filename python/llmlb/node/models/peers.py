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
- every byte goes through one upload budget (``--peer-upload-mbps``, a token bucket shared by
  all uploads), and at most :data:`MAX_UPLOADS` run at once (429 beyond), so serving peers
  never starves inference.

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

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from llmlb.errors import ApiError, ModelNotRegistered, model_not_found
from llmlb.http import bearer_token, error_response, model_id_or_400
from llmlb.model_storage import is_safe_relative_path
from llmlb.node.models.download.staging import file_signature, read_marker
from llmlb.node.models.hashing import sha256_file

if TYPE_CHECKING:
    from llmlb.node.models.resolver import Resolver

logger = logging.getLogger(__name__)

PREFIX = "/v0/peer/files/"
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


class TransferStats:
    """Per-model transfer counters of this node (reports) and their metrics.

    Args:
        registry: the node's Prometheus registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._models: dict[str, _ModelCounters] = {}
        self._lock = threading.Lock()
        r = registry if registry is not None else CollectorRegistry()
        self.source_bytes = Counter(
            "llmlb_node_download_source_bytes",
            "Verified model bytes downloaded, by source (hub|peer)",
            ["source"],
            registry=r,
        )
        self.served_bytes = Counter(
            "llmlb_node_peer_served_bytes", "Model bytes served to other nodes", registry=r
        )
        self.uploads = Gauge(
            "llmlb_node_peer_uploads", "Transfers to other nodes in progress", registry=r
        )
        self.refused = Counter(
            "llmlb_node_peer_refused",
            "Peer requests refused, by reason",
            ["reason"],
            registry=r,
        )
        self.bad_peers = Counter(
            "llmlb_node_bad_peer_files",
            "Files from a peer that failed their check (refetched from the hub)",
            registry=r,
        )

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

    def fields(self, model_id: str) -> dict[str, int]:
        """The report fields of ``model_id`` (only counters that moved)."""
        with self._lock:
            counters = self._models.get(model_id)
            if counters is None:
                return {}
            data = {
                "bytes_from_hub": counters.bytes_from_hub,
                "bytes_from_peers": counters.bytes_from_peers,
                "uploads": counters.uploads,
                "bytes_served": counters.bytes_served,
            }
        return {k: v for k, v in data.items() if v}

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
                ApiError(401, "invalid_api_key", "the peer route needs this fleet's peer token"),
            )

    def _target(self, request: Request) -> tuple[str, str]:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        path = raw.decode("latin-1").partition("?")[0]
        rest = path[len(PREFIX) :] if path.startswith(PREFIX) else ""
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

    async def handle(self, request: Request) -> Response:
        """``GET``/``HEAD /v0/peer/files/{model_id}/{filename}``."""
        try:
            self._check_token(request)
            if self.budget is None:
                raise self._refuse(
                    "disabled",
                    ApiError(503, "peer_disabled", "this node serves no peers", retry_after=60),
                )
            model_id, filename = self._target(request)
            path, size, digest = await self._verified(model_id, filename)
            span = _parse_range(request.headers.get("range"), size)
        except ApiError as exc:
            return error_response(exc)
        start, end = span if span is not None else (0, size)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Length": str(end - start),
            "ETag": f'"{digest}"',
            "X-Linked-Size": str(size),
        }
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        if self.stats.active_uploads() >= MAX_UPLOADS:
            exc = ApiError(429, "peer_busy", "too many peer transfers", retry_after=1)
            return error_response(self._refuse("busy", exc))
        return StreamingResponse(
            self._body(model_id, path, start, end),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    async def _body(self, model_id: str, path: Path, start: int, end: int) -> AsyncIterator[bytes]:
        assert self.budget is not None
        self.stats.upload_started(model_id)
        fd = os.open(path, os.O_RDONLY)
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
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            self.stats.upload_ended(model_id)


def routes(service_of: Callable[[Request], PeerService]) -> list[Any]:
    """The peer route for a Starlette app; ``service_of`` finds the request's service."""
    from starlette.routing import Route

    async def peer_files(request: Request) -> Response:
        return await service_of(request).handle(request)

    return [Route(PREFIX + "{rest:path}", peer_files, methods=["GET", "HEAD"])]
