"""Node-first model resolution and the per-model state table the node reports.

A model resolves from the node's own store when it is there and valid; otherwise from the
router's manifest, by downloading (:mod:`llmlb.node.models.download`) in a background thread.
One resolution per model at a time within the process (single flight); the downloader's file
lock covers other processes on the same store.

A failed download is retried on its own, with exponential backoff (``RETRY_BASE_S`` doubling
up to ``RETRY_MAX_S``, ±10 % jitter), for as long as the model is registered; its report
carries the reason (``error``), ``attempts`` and the next try (``retry_at``, unix seconds).
A model that none of the node's runtimes serves (:mod:`llmlb.node.models.runtimes`) is not
downloaded unless the node stores models for others (``store_all``): it is reported
``failed`` with the reason, ``servable: false``, and not retried.

Peers: a node registered with the router (``fleet``) names itself when it asks for a
manifest, and downloads from the peers the answer lists (:mod:`llmlb.node.models.download.fetch`).
When the answer says a seed is still fetching the model (``peer_wait_s``), it asks again
every :data:`PEER_POLL_S` until a peer is ready or that time passed, then goes to the hub. A
peer whose bytes failed a check is reported to the router and never used for that model
again by this node.

Load during the hash (:meth:`Resolver.load_during_hash`, given the engine's ``load`` and
``unload``): a GGUF model starts loading as soon as its bytes landed and passed the native
layout check, while its sha256 finishes (:mod:`llmlb.node.models.download.load_ahead`). It stays
``downloading`` (requests get ``model_not_ready``) until every file verified and the model
was promoted; a file that fails its check is unloaded, discarded and refetched. The transfer
worker pool starts with a resolver that talks to a router (in the background), not with the
first download (:data:`PRESTART_AFTER_S` after the resolver is made).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmlb.errors import (
    ApiError,
    DownloadCancelled,
    DownloadError,
    ModelNotRegistered,
    RouterUnavailable,
    model_not_found,
)
from llmlb.node.events import AsyncSignal, Signal
from llmlb.node.metrics import NodeMetrics
from llmlb.node.models import runtimes
from llmlb.node.models.download.fetch import ModelFetch, select_files
from llmlb.node.models.download.load_ahead import LoadAhead, LoadFn, UnloadFn
from llmlb.node.models.download.options import DownloadOptions, DownloadProgress
from llmlb.node.models.download.staging import read_marker
from llmlb.node.models.download.workers import shared_pool
from llmlb.node.models.identity import node_secret
from llmlb.node.models.peers import TransferStats
from llmlb.node.models.pieces import PieceBoard
from llmlb.node.models.router_client import fetch_manifest, report_peer
from llmlb.protocol import Manifest, ModelReport, ModelState, PeerReport, PeerSource

logger = logging.getLogger(__name__)

#: First delay before a failed download is tried again; it doubles per failure up to the cap.
RETRY_BASE_S = 1.0
RETRY_MAX_S = 600.0
#: How often a node waiting for a seed's copy asks the router again.
PEER_POLL_S = 0.25
#: When the transfer worker starts after the resolver: past the node's start-up (``/ready``
#: does not share the CPU with its interpreter start), well before a realistic first
#: download (one that comes sooner starts it itself).
PRESTART_AFTER_S = 1.0


def retry_delay(attempts: int, base: float = RETRY_BASE_S, cap: float = RETRY_MAX_S) -> float:
    """Seconds before the next try after ``attempts`` failed ones (1 s, 2 s, 4 s … 10 min)."""
    return min(cap, base * 2 ** min(max(attempts - 1, 0), 32))


@dataclass
class ModelRecord:
    """What the node knows about one model that is not simply ready on disk."""

    state: ModelState
    bytes: int = 0
    total: int = 0
    error: str | None = None
    since: float = 0.0
    attempts: int = 0  # failed tries in a row
    retry_at: float | None = None  # unix time of the next automatic try (failed only)

    def to_dict(self, model_id: str) -> dict[str, Any]:
        """The per-model entry of heartbeats and ``/api/models/status``."""
        report = ModelReport(
            model_id,
            self.state,
            progress=(self.bytes, self.total) if self.total else None,
            error=self.error,
        )
        if self.attempts:
            report.attempts = self.attempts
            report.retry_at = round(self.retry_at) if self.retry_at is not None else None
        data = report.to_dict()
        data.setdefault("progress", None)  # the node's reports name both, known or not
        data.setdefault("error", None)
        if self.attempts:
            data.setdefault("retry_at", None)
        return data


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
        store_all: also download models none of the node's runtimes serves (a node that
            holds models for others).
        fleet: returns ``(node_id, peer_token)`` once the node is registered (``None``, or a
            ``None`` token: no peers); :meth:`Membership.fleet`.
        peer_fetch: download from peers when the router lists some (else the hub only).
        stats: per-model transfer counters (bytes by source, uploads).
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
        options: DownloadOptions | None = None,
        store_all: bool = False,
        fleet: Callable[[], tuple[str, str | None]] | None = None,
        peer_fetch: bool = True,
        stats: TransferStats | None = None,
    ):
        self.store = store
        self.models_dir = Path(models_dir)
        self.router = router
        self.metrics = metrics
        self.allowed_hosts = allowed_hosts
        self.token = token
        self.options = options or DownloadOptions()
        self.changed = Signal()  # a model changed state (emitted on the event loop)
        self.downloaded = AsyncSignal()  # (model_id, path): a servable model just arrived
        self.store_all = store_all
        self.states: dict[str, ModelRecord] = {}
        self.manifests: dict[str, Manifest] = {}
        self.available: dict[str, Any] = {}
        self._fresh: set[str] = set()
        self._gone: set[str] = set()
        self._tasks: dict[str, asyncio.Task] = {}
        self._fetches: dict[str, ModelFetch] = {}
        self._manifest_calls: dict[str, asyncio.Future] = {}
        self._failures: dict[str, int] = {}  # failed tries in a row, per model
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="download")
        self.fleet = fleet
        self.peer_fetch = peer_fetch
        self.stats = stats if stats is not None else TransferStats()
        self.bad_peers: dict[str, set[str]] = {}  # per model: peers that served bad bytes
        self.board = PieceBoard()  # pieces this node holds, for the swarm (peers.py serves)
        self._revisions: dict[str, str | None] = {}  # downloaded models' revisions
        self._waits: dict[str, asyncio.Event] = {}  # models waiting for a peer: cancel
        self._ahead: tuple[LoadFn, UnloadFn] | None = None
        if router is not None:  # the first download finds its transfer worker started
            timer = threading.Timer(PRESTART_AFTER_S, lambda: shared_pool().prestart(1))
            timer.daemon = True
            timer.start()

    def load_during_hash(self, load: LoadFn, unload: UnloadFn) -> None:
        """Load downloaded GGUF models with ``load(model_id, path)`` while their hash
        finishes; ``unload(model_id)`` drops one whose file then fails its check."""
        self._ahead = (load, unload)

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
            if state is not None and state.state == ModelState.FAILED and not self.busy(model_id):
                del self.states[model_id]  # placed (or fixed) by hand since it failed
                self._clear_failures(model_id)
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
        self._revisions.pop(model_id, None)
        self.bad_peers.pop(model_id, None)
        self.board.drop(model_id)
        self.stats.forget(model_id)
        self._clear_failures(model_id)

    def reports(self) -> list[dict[str, Any]]:
        """Per-model state of every model the node has or is working on.

        A valid model in the store is ``ready`` (with its ``format`` and ``size_bytes``)
        unless it is loading; a failed attempt does not hide a model that is on disk. Every
        report says whether one of the node's runtimes serves the model (``servable``).
        """
        reports: dict[str, dict[str, Any]] = {
            model_id: ModelReport(
                model_id,
                ModelState.READY,
                format=desc.format,
                size_bytes=desc.size_bytes,
                servable=runtimes.servable(desc.format),
                revision=self._revision(model_id),
            ).to_dict()
            for model_id, desc in list(self.available.items())
        }
        for model_id, state in list(self.states.items()):
            base = reports.get(model_id)
            if base is not None and state.state == ModelState.FAILED:
                continue
            report = {**(base or {}), **state.to_dict(model_id)}
            report.setdefault("servable", runtimes.servable(self.format_of(model_id)))
            reports[model_id] = report
        for model_id, report in reports.items():
            report.update(self.stats.fields(model_id))
        return list(reports.values())

    def _revision(self, model_id: str) -> str | None:
        """The revision this node downloaded ``model_id`` at (``None``: placed by hand)."""
        if model_id not in self._revisions:
            marker = read_marker(self.models_dir, model_id) or {}
            revision = marker.get("revision")
            self._revisions[model_id] = revision if isinstance(revision, str) else None
        return self._revisions[model_id]

    def format_of(self, model_id: str) -> str | None:
        """The model's format: from the store when it is there, else from its manifest."""
        desc = self.available.get(model_id)
        if desc is not None:
            return desc.format
        manifest = self.manifests.get(model_id)
        return _manifest_format(manifest) if manifest is not None else None

    def template_for(self, model_id: str) -> str | None:
        """The manifest's chat template of ``model_id`` if one was fetched."""
        manifest = self.manifests.get(model_id)
        return manifest.chat_template if manifest else None

    # -- state --------------------------------------------------------------------------

    def _set(self, model_id: str, state: ModelRecord | None) -> None:
        if state is None:
            self.states.pop(model_id, None)
        else:
            state.since = time.time()
            self.states[model_id] = state
        self.changed.emit()

    def state_of(self, model_id: str) -> ModelRecord | None:
        """Non-ready state of ``model_id`` (downloading, loading, failed) or ``None``."""
        return self.states.get(model_id)

    def busy(self, model_id: str) -> bool:
        """Whether a resolution of ``model_id`` is in flight."""
        return model_id in self._tasks

    # -- manifests ----------------------------------------------------------------------

    async def manifest(self, model_id: str) -> Manifest:
        """The router's manifest of ``model_id`` (one request at a time per model).

        Raises:
            ModelNotRegistered, RouterUnavailable: see :func:`router_client.fetch_manifest`.
        """
        if self.router is None:
            raise ModelNotRegistered(f"model {model_id!r} is not in this node's store")
        pending = self._manifest_calls.get(model_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            node_id = self.fleet()[0] if self.fleet is not None else None
            router = self.router
            pending = loop.run_in_executor(
                None,
                lambda: fetch_manifest(router.url, router.api_key, model_id, node_id=node_id),
            )
            self._manifest_calls[model_id] = pending
            pending.add_done_callback(lambda _f: self._manifest_calls.pop(model_id, None))
        manifest = replace(await asyncio.shield(pending), model_id=model_id)
        self.manifests[model_id] = manifest
        return manifest

    # -- resolution ---------------------------------------------------------------------

    def ensure(self, model_id: str, retry_failed: bool = True) -> asyncio.Task:
        """Start (or join) the background resolution of ``model_id``.

        Args:
            model_id: the model.
            retry_failed: retry a failed model now; with ``False`` only once its backoff has
                passed (a model none of the runtimes serves is then not retried at all).
        """
        task = self._tasks.get(model_id)
        if task is not None:
            return task
        state = self.states.get(model_id)
        waiting = state is not None and state.state == ModelState.FAILED and not retry_failed
        if waiting and state is not None and (
            state.retry_at is None or time.time() < state.retry_at
        ):
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done  # type: ignore[return-value]
        self._cancel_retry(model_id)
        task = asyncio.get_running_loop().create_task(self._resolve(model_id))
        self._tasks[model_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(model_id, None))
        return task

    async def _resolve(self, model_id: str) -> str | None:
        if (path := self.local_path(model_id)) is not None:
            self._clear_failures(model_id)
            if model_id in self.states:
                self._set(model_id, None)
            return path
        try:
            manifest = await self.manifest(model_id)
        except ModelNotRegistered as exc:  # deleted meanwhile: nothing left to retry
            logger.info("%s", exc)
            self._clear_failures(model_id)
            self._set(model_id, None)
            return None
        except DownloadError as exc:
            logger.warning("%s", exc)
            self._failed(model_id, str(exc))
            return None
        fmt = _manifest_format(manifest)
        if not self.store_all and fmt is not None and not runtimes.servable(fmt):
            logger.info("%s: not downloaded: %s", model_id, runtimes.not_servable_reason(fmt))
            self._clear_failures(model_id)
            self._set(
                model_id, ModelRecord(ModelState.FAILED, error=runtimes.not_servable_reason(fmt))
            )
            return None
        total = sum(f.size_bytes for f in select_files(manifest)) if manifest.files else 0
        state = ModelRecord(ModelState.DOWNLOADING, total=total)
        self._set(model_id, state)
        try:
            manifest = await self._wait_for_peers(manifest)
        except DownloadCancelled:
            self._set(model_id, None)
            return None
        peers, peer_token = self._usable_peers(manifest)

        promoted = False
        loop = asyncio.get_running_loop()
        ahead = (
            LoadAhead(loop, model_id, *self._ahead)
            if self._ahead is not None and fmt == "gguf"
            else None
        )

        def progress(p: DownloadProgress) -> None:
            nonlocal promoted
            state.bytes, state.total = p.bytes_done, p.bytes_total
            self.stats.downloading(model_id, p.bytes_from_hub, p.bytes_from_peers)
            promoted = True  # reported only by a fetch that downloads (not one that waited)

        fetch = ModelFetch(
            self.store,
            self.models_dir,
            manifest,
            allowed_hosts=self.allowed_hosts,
            token=self.token,
            progress=progress,
            options=self.options,
            peers=peers,
            peer_token=peer_token,
            on_bad_peer=lambda peer, reason: self._bad_peer(model_id, peer, reason),
            load_ahead=ahead,
            board=self.board,
            node_id=self.fleet()[0] if self.fleet is not None else None,
            refresh_peers=lambda: self._refresh_peers(model_id),
            on_piece=lambda source, n: self.stats.piece(model_id, source, n),
        )
        self._fetches[model_id] = fetch
        started = time.monotonic()
        try:
            desc = await loop.run_in_executor(self._pool, fetch.run)
        except DownloadCancelled:
            if ahead is not None:
                await ahead.drop("the download was cancelled")
            self._set(model_id, None)
            return None
        except Exception as exc:  # noqa: BLE001 - recorded as the model's failure
            if ahead is not None:
                await ahead.drop()
            message = str(exc) if isinstance(exc, DownloadError) else f"{model_id}: {exc!r}"
            logger.error("download failed: %s", message)
            self.metrics.downloads.labels("failed").inc()
            self._failed(model_id, message)
            return None
        finally:
            self._fetches.pop(model_id, None)
        self._revisions.pop(model_id, None)
        if promoted:
            self.stats.downloaded(model_id, fetch.bytes_from_hub, fetch.bytes_from_peers)
            self.metrics.downloads.labels("ok").inc()
            self.metrics.download_bytes.inc(total)
            self.metrics.download_seconds.observe(time.monotonic() - started)
            logger.info("%s: downloaded in %.3fs", model_id, time.monotonic() - started)
        else:  # another process on this store finished it while we waited for its lock
            self.metrics.downloads.labels("shared").inc()
            logger.info("%s: downloaded by another process on this store", model_id)
        path = str(desc.primary_path)
        self._add_available(model_id, desc)
        self._clear_failures(model_id)
        if self.downloaded and runtimes.servable(desc.format):
            self._set(model_id, ModelRecord(ModelState.LOADING, bytes=total, total=total))
            try:
                if ahead is not None:
                    await ahead.settle()  # the load during the hash, verified now
                await self.downloaded.emit(model_id, path)
            except Exception as exc:  # noqa: BLE001 - it loads lazily on first use instead
                logger.warning("%s: load after download failed: %s", model_id, exc)
        self._set(model_id, None)
        if promoted and fetch.last_byte_at is not None:
            after = time.monotonic() - fetch.last_byte_at
            logger.info("%s: ready %.3fs after its last byte", model_id, after)
        return path

    # -- peers --------------------------------------------------------------------------

    def _usable_peers(self, manifest: Manifest) -> tuple[list[PeerSource], str | None]:
        """The manifest's peers this node may fetch from, and the fleet credential."""
        if not self.peer_fetch or self.fleet is None:
            return [], None
        node_id, token = self.fleet()
        if not token:
            return [], None
        bad = self.bad_peers.get(manifest.model_id, set())
        peers = [p for p in manifest.peers if p.node_id != node_id and p.node_id not in bad]
        return peers, token

    def _refresh_peers(self, model_id: str) -> list[PeerSource]:
        """The router's current peers of ``model_id`` for this node (blocking; a swarm
        download asks while it runs)."""
        if self.router is None or self.fleet is None:
            return []
        node_id = self.fleet()[0]
        manifest = fetch_manifest(
            self.router.url, self.router.api_key, model_id, timeout=5.0, node_id=node_id
        )
        return self._usable_peers(replace(manifest, model_id=model_id))[0]

    async def _wait_for_peers(self, manifest: Manifest) -> Manifest:
        """Ask again while the router says a seed is fetching the model and no peer has it,
        for up to ``peer_wait_s``; the last answer.

        Raises:
            DownloadCancelled: the model's download was cancelled meanwhile.
        """
        model_id = manifest.model_id
        if manifest.peer_wait_s is None or self._usable_peers(manifest)[1] is None:
            return manifest
        deadline = time.monotonic() + manifest.peer_wait_s
        cancelled = self._waits[model_id] = asyncio.Event()
        logger.info("%s: waiting up to %.0fs for a peer", model_id, manifest.peer_wait_s)
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cancelled.wait(), PEER_POLL_S)
                if cancelled.is_set():
                    raise DownloadCancelled(f"{model_id}: cancelled while waiting for a peer")
                try:
                    manifest = await self.manifest(model_id)
                except (ModelNotRegistered, RouterUnavailable) as exc:
                    logger.info("%s: %s; going to the hub", model_id, exc)
                    break
                if manifest.peer_wait_s is None or self._usable_peers(manifest)[0]:
                    return manifest
            logger.info("%s: no peer has it yet; fetching from the hub", model_id)
            return replace(manifest, peer_wait_s=None)
        finally:
            self._waits.pop(model_id, None)

    def _bad_peer(self, model_id: str, peer: PeerSource, reason: str) -> None:
        """A peer's bytes of ``model_id`` failed a check (called from a download thread)."""
        self.bad_peers.setdefault(model_id, set()).add(peer.node_id)
        self.stats.bad_peers.inc()
        logger.warning("%s: peer %s served bad bytes (%s)", model_id, peer.node_id, reason)
        if self.router is not None:
            reporter = self.fleet()[0] if self.fleet is not None else None
            secret = node_secret(self.models_dir, reporter) if reporter else None
            try:
                report_peer(
                    self.router.url,
                    self.router.api_key,
                    PeerReport(model_id, peer.node_id, reason, reporter, secret),
                )
            except RouterUnavailable as exc:
                logger.warning("%s: %s", model_id, exc)

    # -- retries ------------------------------------------------------------------------

    def _failed(self, model_id: str, message: str) -> None:
        """Record a failed try and schedule the next one (exponential backoff, jittered)."""
        attempts = self._failures.get(model_id, 0) + 1
        self._failures[model_id] = attempts
        delay = retry_delay(attempts) * random.uniform(0.9, 1.1)
        state = ModelRecord(
            ModelState.FAILED, error=message, attempts=attempts, retry_at=time.time() + delay
        )
        self._set(model_id, state)
        self._cancel_retry(model_id)
        loop = asyncio.get_running_loop()
        self._retries[model_id] = loop.call_later(delay, self._retry_due, model_id)
        logger.info("%s: try %d failed; next try in %.1fs", model_id, attempts, delay)

    def _retry_due(self, model_id: str) -> None:
        self._retries.pop(model_id, None)
        state = self.states.get(model_id)
        if state is not None and state.state == ModelState.FAILED and state.retry_at is not None:
            self.ensure(model_id)

    def _cancel_retry(self, model_id: str) -> None:
        handle = self._retries.pop(model_id, None)
        if handle is not None:
            handle.cancel()

    def _clear_failures(self, model_id: str) -> None:
        self._failures.pop(model_id, None)
        self._cancel_retry(model_id)

    async def cancel(self, model_id: str) -> None:
        """Stop an in-flight download of ``model_id``."""
        fetch = self._fetches.get(model_id)
        if fetch is not None:
            fetch.cancel()
        if (waiting := self._waits.get(model_id)) is not None:
            waiting.set()
        task = self._tasks.get(model_id)
        if task is not None:
            await asyncio.wait({task}, timeout=30)

    async def close(self) -> None:
        """Cancel every download and pending retry (node shutdown)."""
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for fetch in list(self._fetches.values()):
            fetch.cancel()
        for waiting in list(self._waits.values()):
            waiting.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks.values()), timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- serving ------------------------------------------------------------------------

    async def serving_path(self, model_id: str) -> str:
        """The primary file to serve ``model_id`` from, or an ``ApiError``.

        Raises:
            ApiError: 503 ``model_not_ready`` while it downloads (a missing but registered
                model starts downloading), 503 ``model_failed`` (``Retry-After``: the next
                automatic try), 404 ``model_not_found``, 400 ``model_not_servable`` for a
                model none of the node's runtimes serves.
        """
        state = self.states.get(model_id)
        if state is not None and state.state == ModelState.DOWNLOADING:
            raise _not_ready(model_id, state)
        path = self.local_path(model_id)
        if path is not None:
            fmt = self.format_of(model_id)
            if not runtimes.servable(fmt):
                raise _not_servable(model_id, fmt)
            return path
        if state is not None and state.state == ModelState.FAILED and not self.busy(model_id):
            if state.retry_at is None and self.manifests.get(model_id) is not None:
                fmt = self.format_of(model_id)
                if not runtimes.servable(fmt):
                    raise _not_servable(model_id, fmt)
            wait = state.retry_at - time.time() if state.retry_at is not None else 5
            raise ApiError(
                503,
                "model_failed",
                state.error or f"model {model_id!r} failed",
                retry_after=max(1.0, wait),
            )
        if not self.busy(model_id):
            try:
                await self.manifest(model_id)
            except ModelNotRegistered:
                raise model_not_found(model_id) from None
            except RouterUnavailable as exc:
                raise ApiError(503, "model_not_ready", str(exc), retry_after=5) from None
            fmt = self.format_of(model_id)
            if fmt is not None and not runtimes.servable(fmt):
                if self.store_all:
                    self.ensure(model_id)  # stored for others all the same
                raise _not_servable(model_id, fmt)
            self.ensure(model_id)
        raise _not_ready(model_id, self.states.get(model_id))


def _manifest_format(manifest: Manifest) -> str | None:
    """A manifest's model format, from its ``format`` or else its primary file's name."""
    if manifest.format:
        return manifest.format
    for spec in sorted(manifest.files, key=lambda f: f.priority):
        for suffix in ("gguf", "safetensors"):
            if spec.filename.endswith(f".{suffix}"):
                return suffix
    return None


def _not_servable(model_id: str, model_format: str | None) -> ApiError:
    return ApiError(
        400,
        "model_not_servable",
        f"model {model_id!r} cannot be served by this node: "
        f"{runtimes.not_servable_reason(model_format)} "
        f"(runtimes: {', '.join(runtimes.RUNTIMES)})",
        param="model",
    )


def _not_ready(model_id: str, state: ModelRecord | None) -> ApiError:
    detail = ""
    if state is not None and state.total:
        detail = f" ({state.bytes}/{state.total} bytes)"
    return ApiError(
        503,
        "model_not_ready",
        f"model {model_id!r} is being downloaded{detail}; retry shortly",
        retry_after=2,
    )
