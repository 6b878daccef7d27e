"""The hub stand-in's aiohttp app: :class:`HubStandin` (auth, request log, faults, the
``/api/models/...`` metadata routes and ``resolve`` downloads with ranges and bandwidth caps).

Apart from :mod:`.server` (the command line, and the routes and flags it documents).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, unquote

import orjson
from aiohttp import web

from llmlb.testing.hub_standin.faults import Fault, FaultPlan
from llmlb.testing.hub_standin.repos import RepoFile, RepoSnapshot, RepoStore

logger = logging.getLogger("llmlb.testing.hub_standin")

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_TRUE = ("1", "true", "yes", "on")


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """``(start, end_exclusive)`` for a single-range ``Range`` header.

    Returns ``None`` when the header should be ignored (malformed or multi-range: the full body
    is served, which RFC 9110 allows) and ``"unsatisfiable"`` for a 416.
    """
    match = _RANGE_RE.match(header)
    if not match:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - length), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or (last != "" and int(last) < start):
        return "unsatisfiable"
    return start, end


class _HubError(Exception):
    """An error answered the way the hub does (status, ``X-Error-Code``, JSON ``error``)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def response(self) -> web.Response:
        headers = {"X-Error-Message": self.message}
        if self.code:
            headers["X-Error-Code"] = self.code
        return web.Response(
            status=self.status,
            body=orjson.dumps({"error": self.message}),
            content_type="application/json",
            headers=headers,
        )


class HubStandin:
    """The stand-in's state and request handlers; :meth:`app` builds the aiohttp app."""

    def __init__(
        self,
        root: Path,
        *,
        bandwidth: float | None = None,
        total_bandwidth: float | None = None,
        faults: FaultPlan | None = None,
        log_path: Path | None = None,
        require_token: str | None = None,
        hash_cache: Path | None = None,
    ):
        self.store = RepoStore(root, hash_cache=hash_cache)
        self.bandwidth = bandwidth
        self.uplink = Uplink(total_bandwidth) if total_bandwidth else None
        self.faults = faults or FaultPlan([])
        self.require_token = require_token
        self._log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self._request_seq = 0
        self._warm_task: asyncio.Task | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        app.on_startup.append(self._warm_up)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _warm_up(self, _app: web.Application) -> None:
        """Index every repo in the background so first requests find hashes ready."""

        async def index_all() -> None:
            for repo_id in self.store.repo_ids():
                try:
                    await self.store.snapshot(repo_id)
                except Exception:  # noqa: BLE001 - a broken repo must not stop the server
                    logger.exception("indexing %s failed", repo_id)

        self._warm_task = asyncio.get_running_loop().create_task(index_all())

    async def _cleanup(self, _app: web.Application) -> None:
        if self._warm_task is not None:
            self._warm_task.cancel()
        self.store.close()
        if self._log is not None:
            self._log.close()

    # ---- middleware: auth and request log -------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        started = time.time()
        self._request_seq += 1
        request["bytes"] = 0
        request["faults"] = []
        status = 500
        error = None
        try:
            if self.require_token and request.path != "/health":
                self._check_token(request)
            response = await handler(request)
            status = response.status
            return response
        except _HubError as exc:
            status = exc.status
            return exc.response()
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            status = request.get("status", 499)
            error = type(exc).__name__
            raise
        finally:
            if self._log is not None:
                self._write_log(request, started, request.get("status", status), error)

    def _check_token(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization")
        if auth is None:
            raise _HubError(401, "Repository not found", "RepoNotFound")
        if auth != f"Bearer {self.require_token}":
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _write_log(
        self, request: web.Request, started: float, status: int, error: str | None
    ) -> None:
        entry = {
            "ts": started,
            "method": request.method,
            "path": request.rel_url.raw_path,
            "query": request.rel_url.raw_query_string,
            "range": request.headers.get("Range"),
            "status": status,
            "bytes": request["bytes"],
            "authorization": "Authorization" in request.headers,
            "user_agent": request.headers.get("User-Agent"),
            "repo": request.get("repo"),
            "file": request.get("file"),
            "faults": request["faults"],
            "error": error or request.get("error"),
        }
        assert self._log is not None
        self._log.write(orjson.dumps(entry) + b"\n")
        self._log.flush()

    # ---- routing --------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [unquote(p) for p in request.rel_url.raw_path.split("/")[1:]]
        method = request.method
        if parts == ["health"] and method in ("GET", "HEAD"):
            return _json({"status": "ok"})
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id = request["repo"] = f"{parts[2]}/{parts[3]}"
            await self._fault_gate(request, "api", repo_id, None)
            return await self._api(request, repo_id, parts[4:])
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id, revision = f"{parts[0]}/{parts[1]}", parts[3]
            path = "/".join(parts[4:])
            request["repo"], request["file"] = repo_id, path
            await self._fault_gate(request, "resolve", repo_id, path)
            return await self._resolve(request, repo_id, revision, path)
        raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    async def _fault_gate(
        self, request: web.Request, route: str, repo: str, file: str | None
    ) -> None:
        """Apply ``delay`` and ``status`` faults that target this request."""
        fault = self.faults.find("delay", route, request.method, repo, file)
        if fault is not None:
            self._fired(request, fault)
            await asyncio.sleep(fault.seconds)
        fault = self.faults.find("status", route, request.method, repo, file)
        if fault is not None:
            self._fired(request, fault)
            raise _HubError(fault.code, f"Injected fault: {fault.spec}")
        fault = self.faults.find("fail-first", route, request.method, repo, file)
        if fault is not None and fault.fails_now(repo, file):
            self._fired(request, fault)
            raise _HubError(503, f"Injected fault: {fault.spec}")

    @staticmethod
    def _fired(request: web.Request, fault: Fault) -> None:
        fault.fire()
        request["faults"].append(fault.kind)

    async def _snapshot(self, repo_id: str, revision: str, rescan: bool = True) -> RepoSnapshot:
        snap = await self.store.snapshot(repo_id, rescan=rescan)
        if snap is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if not snap.resolves(revision):
            if not rescan:
                return await self._snapshot(repo_id, revision, rescan=True)
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return snap

    # ---- /api/models/... ------------------------------------------------------------------

    async def _api(self, request: web.Request, repo_id: str, rest: list[str]) -> web.Response:
        method = request.method
        if not rest and method == "GET":
            return self._model_info(request, await self._snapshot(repo_id, "main"))
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            return self._model_info(request, await self._snapshot(repo_id, rest[1]))
        if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
            snap = await self._snapshot(repo_id, rest[1])
            return self._tree(request, snap, "/".join(rest[2:]).strip("/"))
        if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
            snap = await self._snapshot(repo_id, rest[1])
            return await self._paths_info(request, snap)
        raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    def _model_info(self, request: web.Request, snap: RepoSnapshot) -> web.Response:
        blobs = request.query.get("blobs", "").lower() in _TRUE
        siblings = []
        for f in snap.files.values():
            sibling: dict = {"rfilename": f.path}
            if blobs:
                sibling["blobId"] = f.blob_id
                sibling["size"] = f.size
                if f.lfs:
                    sibling["lfs"] = {
                        "sha256": f.sha256,
                        "size": f.size,
                        "pointerSize": f.pointer_size,
                    }
            siblings.append(sibling)
        org = snap.repo_id.split("/")[0]
        body = {
            "_id": snap.sha[:24],
            "id": snap.repo_id,
            "modelId": snap.repo_id,
            "author": org,
            "sha": snap.sha,
            "lastModified": snap.last_modified_iso(),
            "createdAt": snap.last_modified_iso(),
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"] if any(p.endswith(".gguf") for p in snap.files) else [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in snap.files.values()),
        }
        return _json(body)

    def _entry(self, snap: RepoSnapshot, path: str, expand: bool) -> dict:
        if path in snap.files:
            f = snap.files[path]
            entry: dict = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        else:
            entry = {"type": "directory", "oid": snap.dirs[path], "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = {
                "id": snap.sha,
                "title": "Stand-in snapshot",
                "date": snap.last_modified_iso(),
            }
        return entry

    def _tree(self, request: web.Request, snap: RepoSnapshot, path: str) -> web.Response:
        recursive = request.query.get("recursive", "").lower() in _TRUE
        expand = request.query.get("expand", "").lower() in _TRUE
        if path and path not in snap.dirs:
            if path in snap.files:  # the hub answers a file path with an empty listing error
                raise _HubError(404, f"{path} is not a directory", "EntryNotFound")
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        prefix = f"{path}/" if path else ""
        names = sorted(
            p
            for p in (*snap.dirs, *snap.files)
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        )
        # The hub lists directories before files at each level.
        names.sort(key=lambda p: (p in snap.files, p))
        return _json([self._entry(snap, p, expand) for p in names])

    async def _paths_info(self, request: web.Request, snap: RepoSnapshot) -> web.Response:
        if request.content_type == "application/json":
            try:
                data = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise _HubError(400, "Invalid JSON body") from None
            paths = data.get("paths", []) if isinstance(data, dict) else []
            expand = bool(data.get("expand")) if isinstance(data, dict) else False
        else:
            form = parse_qs((await request.read()).decode(errors="replace"))
            paths = form.get("paths", [])
            expand = (form.get("expand", [""])[-1]).lower() in _TRUE
        if isinstance(paths, str):
            paths = [paths]
        found = []
        for raw in paths:
            path = str(raw).strip("/")
            if path in snap.files or path in snap.dirs:
                found.append(self._entry(snap, path, expand))
        return _json(found)

    # ---- /{org}/{name}/resolve/{rev}/{path} -----------------------------------------------

    async def _resolve(
        self, request: web.Request, repo_id: str, revision: str, path: str
    ) -> web.StreamResponse:
        snap = await self._snapshot(repo_id, revision, rescan=False)
        f = snap.files.get(path)
        if f is None:
            snap = await self._snapshot(repo_id, revision)
            f = snap.files.get(path)
        if f is None:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": snap.sha,
            "X-Request-Id": f"standin-{self._request_seq}",
            "Content-Disposition": f'inline; filename="{Path(path).name}"',
        }
        if f.lfs:
            headers["X-Linked-Size"] = str(f.size)
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
        start, end, status = 0, f.size, 200
        range_header = request.headers.get("Range")
        redirect = self.faults.find("redirect-ranges", "resolve", request.method, repo_id, path)
        if (
            redirect is not None
            and range_header is not None
            and parse_range(range_header, f.size) not in (None, (0, 1))
        ):
            self._fired(request, redirect)
            request["status"] = 302
            location = f"{redirect.to}{request.rel_url.raw_path}"
            return web.Response(status=302, headers={**headers, "Location": location})
        if range_header is not None:
            parsed = parse_range(range_header, f.size)
            if parsed == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{f.size}"
                request["status"] = 416
                return web.Response(status=416, headers=headers)
            full = self.faults.find("full", "resolve", request.method, repo_id, path)
            if full is not None and parsed is not None:
                self._fired(request, full)
            elif isinstance(parsed, tuple):
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        request["status"] = status
        await response.prepare(request)
        if request.method == "HEAD" or end == start:
            await response.write_eof()
            return response
        await self._send_body(request, response, f, start, end)
        return response

    async def _send_body(
        self, request: web.Request, response: web.StreamResponse, f: RepoFile, start: int, end: int
    ) -> None:
        """Stream ``[start, end)`` of ``f`` with sendfile, applying the cap and body faults."""
        repo, path, method = request["repo"], request["file"], request.method
        stop = end
        drop = self.faults.find("drop", "resolve", method, repo, path)
        if drop is not None and end - start > drop.after:
            self._fired(request, drop)
            stop = start + drop.after
        corrupt_at = None
        corrupt = self.faults.find("corrupt", "resolve", method, repo, path)
        if corrupt is not None:
            offset = corrupt.offset if corrupt.offset is not None else f.size // 2
            if start <= offset < stop:
                self._fired(request, corrupt)
                corrupt_at = offset
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        loop = asyncio.get_running_loop()
        chunk = stop - start
        if self.bandwidth:
            chunk = int(min(max(self.bandwidth / 50, 16384), 1 << 20))
        if self.uplink is not None:
            chunk = min(chunk, self.uplink.chunk)
        began = time.monotonic()
        pos = start
        with open(f.abspath, "rb") as fh:
            while pos < stop:
                n = min(chunk, stop - pos)
                try:
                    if self.uplink is not None:
                        await self.uplink.take(n)
                    if transport.is_closing():
                        raise ConnectionResetError("client went away")
                    if corrupt_at is not None and pos <= corrupt_at < pos + n:
                        if corrupt_at > pos:
                            n = corrupt_at - pos
                            await loop.sendfile(transport, fh, pos, n)
                        else:
                            n = 1
                            byte = os.pread(fh.fileno(), 1, pos)
                            await response.write(bytes([byte[0] ^ 0xFF]))
                    else:
                        await loop.sendfile(transport, fh, pos, n)
                except (ConnectionError, RuntimeError) as exc:  # sendfile: "Transport is closing"
                    request["error"] = f"client disconnected: {type(exc).__name__}"
                    transport.close()
                    return
                pos += n
                request["bytes"] = pos - start
                if self.bandwidth:
                    ahead = began + (pos - start) / self.bandwidth - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        if stop < end:  # injected drop: the client sees a short body and a closed connection
            request["error"] = "dropped"
            transport.close()
            return
        await response.write_eof()


class Uplink:
    """A token bucket of ``rate`` bytes/s shared by every connection (burst: 20 ms).

    Waiters are served in arrival order (an asyncio lock), so connections share the rate
    about equally, whatever their number.
    """

    def __init__(self, rate: float):
        self.rate = rate
        self.burst = max(16384.0, rate / 50)
        self.chunk = int(min(self.burst, 1 << 20))
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= n:
                    self._tokens -= n
                    return
                await asyncio.sleep((n - self._tokens) / self.rate)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")
