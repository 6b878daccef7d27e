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
first download (:data:`~.table.PRESTART_AFTER_S` after the resolver is made).

The state it works on, the store's models, the records and the reports, is
:class:`~.table.ModelTable`, which :class:`Resolver` builds on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import replace

from llmlb.errors import (
    ApiError,
    DownloadCancelled,
    DownloadError,
    ModelNotRegistered,
    RouterUnavailable,
    model_not_found,
)
from llmlb.node.models import runtimes
from llmlb.node.models.download.fetch import ModelFetch, select_files
from llmlb.node.models.download.load_ahead import LoadAhead
from llmlb.node.models.download.options import DownloadProgress
from llmlb.node.models.identity import node_secret
from llmlb.node.models.router_client import fetch_manifest, report_peer
from llmlb.node.models.table import ModelRecord, ModelTable, _manifest_format
from llmlb.node.models.table import RouterAccess as RouterAccess
from llmlb.protocol import Manifest, ModelState, PeerReport, PeerSource

logger = logging.getLogger(__name__)

#: First delay before a failed download is tried again; it doubles per failure up to the cap.
RETRY_BASE_S = 1.0
RETRY_MAX_S = 600.0
#: How often a node waiting for a seed's copy asks the router again.
PEER_POLL_S = 0.25


def retry_delay(attempts: int, base: float = RETRY_BASE_S, cap: float = RETRY_MAX_S) -> float:
    """Seconds before the next try after ``attempts`` failed ones (1 s, 2 s, 4 s … 10 min)."""
    return min(cap, base * 2 ** min(max(attempts - 1, 0), 32))


class Resolver(ModelTable):
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
