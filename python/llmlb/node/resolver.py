"""Node-first model resolution and the per-model state table the node reports.

A model resolves from the node's own store when it is there and valid; otherwise from the
router's manifest, by downloading (:mod:`llmlb.node.downloader`) in a background thread.
One resolution per model at a time within the process (single flight); the downloader's file
lock covers other processes on the same store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmlb.errors import ApiError
from llmlb.node import downloader as dl
from llmlb.node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

READY, DOWNLOADING, LOADING, FAILED = "ready", "downloading", "loading", "failed"


@dataclass
class ModelState:
    """What the node knows about one model that is not simply ready on disk."""

    state: str
    bytes: int = 0
    total: int = 0
    error: str | None = None
    since: float = 0.0

    def to_dict(self, model_id: str) -> dict[str, Any]:
        """The per-model entry of heartbeats and ``/api/models/status``."""
        progress = {"bytes": self.bytes, "total": self.total} if self.total else None
        return {"id": model_id, "state": self.state, "progress": progress, "error": self.error}


@dataclass(frozen=True, slots=True)
class RouterAccess:
    """How the node reaches the router (for manifests)."""

    url: str
    api_key: str | None


class Resolver:
    """Resolve model ids to files in the store, downloading what is missing.

    Args:
        store: ``llmlb.model_storage.ModelStorage`` over ``models_dir``.
        models_dir: store root.
        router: router URL and node key, or ``None`` (local models only).
        metrics: download counters.
        allowed_hosts: download allowlist.
        token: hub token (only sent to allowlisted hosts).
        options: downloader tuning.
        on_change: called on the event loop whenever a model changes state.
        after_download: awaited once a model was downloaded (the node loads it).
    """

    def __init__(
        self,
        store: Any,
        models_dir: Path,
        router: RouterAccess | None,
        metrics: NodeMetrics,
        *,
        allowed_hosts: list[str],
        token: str | None,
        options: dl.DownloadOptions | None = None,
        on_change: Callable[[], None] | None = None,
        after_download: Callable[[str, str], Awaitable[None]] | None = None,
    ):
        self.store = store
        self.models_dir = Path(models_dir)
        self.router = router
        self.metrics = metrics
        self.allowed_hosts = allowed_hosts
        self.token = token
        self.options = options or dl.DownloadOptions()
        self.on_change = on_change or (lambda: None)
        self.after_download = after_download
        self.states: dict[str, ModelState] = {}
        self.manifests: dict[str, dl.Manifest] = {}
        self.available: dict[str, Any] = {}
        self._fresh: set[str] = set()
        self._gone: set[str] = set()
        self._tasks: dict[str, asyncio.Task] = {}
        self._fetches: dict[str, dl.ModelFetch] = {}
        self._manifest_calls: dict[str, asyncio.Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="download")

    # -- local store --------------------------------------------------------------------

    def scan(self) -> dict[str, Any]:
        """Descriptors of every valid model in the store (blocking; run it in a thread).

        Descriptors already known are reused while their primary file exists, so a rescan of
        a large store costs one listing.
        """
        known = dict(self.available)
        found: dict[str, Any] = {}
        for model_id in self.store.list_available():
            desc = known.get(model_id)
            if desc is None or not Path(desc.primary_path).exists():
                desc = self.store.resolve(model_id)
            if desc is not None:
                found[model_id] = desc
        return found

    async def refresh(self) -> list[str]:
        """Rescan the store (in a thread); returns the ids of the valid models in it.

        Models promoted or forgotten while the scan ran keep their newer state.
        """
        self._fresh.clear()
        self._gone.clear()
        found = await asyncio.get_running_loop().run_in_executor(None, self.scan)
        for model_id in self._fresh:
            if model_id in self.available:
                found.setdefault(model_id, self.available[model_id])
        for model_id in self._gone:
            found.pop(model_id, None)
        self.available = found
        for model_id in found:
            state = self.states.get(model_id)
            if state is not None and state.state == FAILED and not self.busy(model_id):
                del self.states[model_id]  # placed (or fixed) by hand since it failed
        return list(found)

    def _add_available(self, model_id: str, desc: Any) -> None:
        self.available[model_id] = desc
        self._fresh.add(model_id)
        self._gone.discard(model_id)

    def local_path(self, model_id: str) -> str | None:
        """Primary file of ``model_id`` when the store holds it, valid; else ``None``."""
        desc = self.available.get(model_id)
        if desc is not None and Path(desc.primary_path).exists():
            return str(desc.primary_path)
        desc = self.store.resolve(model_id)
        if desc is None:
            self.available.pop(model_id, None)
            return None
        self._add_available(model_id, desc)
        return str(desc.primary_path)

    def forget_local(self, model_id: str) -> None:
        """Drop cached knowledge of ``model_id`` (after a delete)."""
        self.available.pop(model_id, None)
        self._fresh.discard(model_id)
        self._gone.add(model_id)
        self.states.pop(model_id, None)
        self.manifests.pop(model_id, None)

    def reports(self) -> list[dict[str, Any]]:
        """Per-model state of every model the node has or is working on.

        A valid model in the store is ``ready`` (with its ``format`` and ``size_bytes``)
        unless it is loading; a failed attempt does not hide a model that is on disk.
        """
        reports: dict[str, dict[str, Any]] = {
            model_id: {
                "id": model_id,
                "state": READY,
                "format": desc.format,
                "size_bytes": desc.size_bytes,
            }
            for model_id, desc in list(self.available.items())
        }
        for model_id, state in list(self.states.items()):
            base = reports.get(model_id)
            if base is not None and state.state == FAILED:
                continue
            reports[model_id] = {**(base or {}), **state.to_dict(model_id)}
        return list(reports.values())

    def template_for(self, model_id: str) -> str | None:
        """The manifest's chat template of ``model_id`` if one was fetched."""
        manifest = self.manifests.get(model_id)
        return manifest.chat_template if manifest else None

    # -- state --------------------------------------------------------------------------

    def _set(self, model_id: str, state: ModelState | None) -> None:
        if state is None:
            self.states.pop(model_id, None)
        else:
            state.since = time.time()
            self.states[model_id] = state
        self.on_change()

    def state_of(self, model_id: str) -> ModelState | None:
        """Non-ready state of ``model_id`` (downloading, loading, failed) or ``None``."""
        return self.states.get(model_id)

    def busy(self, model_id: str) -> bool:
        """Whether a resolution of ``model_id`` is in flight."""
        return model_id in self._tasks

    # -- manifests ----------------------------------------------------------------------

    async def manifest(self, model_id: str) -> dl.Manifest:
        """The router's manifest of ``model_id`` (one request at a time per model).

        Raises:
            ModelNotRegistered, RouterUnavailable: see :func:`downloader.fetch_manifest`.
        """
        if self.router is None:
            raise dl.ModelNotRegistered(f"model {model_id!r} is not in this node's store")
        pending = self._manifest_calls.get(model_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(
                None, dl.fetch_manifest, self.router.url, self.router.api_key, model_id
            )
            self._manifest_calls[model_id] = pending
            pending.add_done_callback(lambda _f: self._manifest_calls.pop(model_id, None))
        manifest = replace(await asyncio.shield(pending), model_id=model_id)
        self.manifests[model_id] = manifest
        return manifest

    # -- resolution ---------------------------------------------------------------------

    def ensure(self, model_id: str, retry_failed: bool = True) -> asyncio.Task:
        """Start (or join) the background resolution of ``model_id``."""
        task = self._tasks.get(model_id)
        if task is not None:
            return task
        state = self.states.get(model_id)
        if state is not None and state.state == FAILED and not retry_failed:
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done  # type: ignore[return-value]
        task = asyncio.get_running_loop().create_task(self._resolve(model_id))
        self._tasks[model_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(model_id, None))
        return task

    async def _resolve(self, model_id: str) -> str | None:
        if (path := self.local_path(model_id)) is not None:
            if model_id in self.states:
                self._set(model_id, None)
            return path
        try:
            manifest = await self.manifest(model_id)
        except dl.DownloadError as exc:
            logger.warning("%s", exc)
            self._set(model_id, ModelState(FAILED, error=str(exc)))
            return None
        total = sum(f.size_bytes for f in dl.select_files(manifest)) if manifest.files else 0
        state = ModelState(DOWNLOADING, total=total)
        self._set(model_id, state)

        promoted = False

        def progress(p: dl.DownloadProgress) -> None:
            nonlocal promoted
            state.bytes, state.total = p.bytes_done, p.bytes_total
            promoted = True  # reported only by a fetch that downloads (not one that waited)

        fetch = dl.ModelFetch(
            self.store,
            self.models_dir,
            manifest,
            allowed_hosts=self.allowed_hosts,
            token=self.token,
            progress=progress,
            options=self.options,
        )
        self._fetches[model_id] = fetch
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            desc = await loop.run_in_executor(self._pool, fetch.run)
        except dl.DownloadCancelled:
            self._set(model_id, None)
            return None
        except Exception as exc:  # noqa: BLE001 - recorded as the model's failure
            message = str(exc) if isinstance(exc, dl.DownloadError) else f"{model_id}: {exc!r}"
            logger.error("download failed: %s", message)
            self.metrics.downloads.labels("failed").inc()
            self._set(model_id, ModelState(FAILED, error=message))
            return None
        finally:
            self._fetches.pop(model_id, None)
        if promoted:
            self.metrics.downloads.labels("ok").inc()
            self.metrics.download_bytes.inc(total)
            self.metrics.download_seconds.observe(time.monotonic() - started)
            logger.info("%s: downloaded in %.3fs", model_id, time.monotonic() - started)
        else:  # another process on this store finished it while we waited for its lock
            self.metrics.downloads.labels("shared").inc()
            logger.info("%s: downloaded by another process on this store", model_id)
        path = str(desc.primary_path)
        self._add_available(model_id, desc)
        if self.after_download is not None:
            self._set(model_id, ModelState(LOADING, bytes=total, total=total))
            try:
                await self.after_download(model_id, path)
            except Exception as exc:  # noqa: BLE001 - it loads lazily on first use instead
                logger.warning("%s: load after download failed: %s", model_id, exc)
        self._set(model_id, None)
        return path

    async def cancel(self, model_id: str) -> None:
        """Stop an in-flight download of ``model_id``."""
        fetch = self._fetches.get(model_id)
        if fetch is not None:
            fetch.cancel()
        task = self._tasks.get(model_id)
        if task is not None:
            await asyncio.wait({task}, timeout=30)

    async def close(self) -> None:
        """Cancel every download (node shutdown)."""
        for fetch in list(self._fetches.values()):
            fetch.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks.values()), timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- serving ------------------------------------------------------------------------

    async def serving_path(self, model_id: str) -> str:
        """The primary file to serve ``model_id`` from, or an ``ApiError``.

        Raises:
            ApiError: 503 ``model_not_ready`` while it downloads (a missing but registered
                model starts downloading), 503 ``model_failed``, 404 ``model_not_found``.
        """
        state = self.states.get(model_id)
        if state is not None and state.state == DOWNLOADING:
            raise _not_ready(model_id, state)
        path = self.local_path(model_id)
        if path is not None:
            return path
        if state is not None and state.state == FAILED and not self.busy(model_id):
            raise ApiError(
                503, "model_failed", state.error or f"model {model_id!r} failed", retry_after=5
            )
        if not self.busy(model_id):
            try:
                await self.manifest(model_id)
            except dl.ModelNotRegistered:
                raise ApiError(
                    404,
                    "model_not_found",
                    f"model {model_id!r} is neither in this node's store nor "
                    "registered with the router",
                ) from None
            except dl.RouterUnavailable as exc:
                raise ApiError(503, "model_not_ready", str(exc), retry_after=5) from None
            self.ensure(model_id)
        raise _not_ready(model_id, self.states.get(model_id))


def _not_ready(model_id: str, state: ModelState | None) -> ApiError:
    detail = ""
    if state is not None and state.total:
        detail = f" ({state.bytes}/{state.total} bytes)"
    return ApiError(
        503,
        "model_not_ready",
        f"model {model_id!r} is being downloaded{detail}; retry shortly",
        retry_after=2,
    )
