"""What the node knows of its models: the valid models in its store, a record of each model
it is working on (downloading, loading, failed), the reports built from both, and the
router's manifests (one request at a time per model).

Apart from :mod:`.resolver` (which downloads, retries and decides what is served) because it
is the read side every part of the node consults; :class:`ModelTable` holds the resolver's
state and :class:`~.resolver.Resolver` builds on it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmlb.errors import ModelNotRegistered
from llmlb.node.events import AsyncSignal, Signal
from llmlb.node.metrics import NodeMetrics
from llmlb.node.models import runtimes
from llmlb.node.models.download.fetch import ModelFetch
from llmlb.node.models.download.load_ahead import LoadFn, UnloadFn
from llmlb.node.models.download.options import DownloadOptions
from llmlb.node.models.download.staging import read_marker
from llmlb.node.models.download.workers import shared_pool
from llmlb.node.models.peers import TransferStats
from llmlb.node.models.pieces import PieceBoard
from llmlb.node.models.router_client import fetch_manifest
from llmlb.protocol import Manifest, ModelReport, ModelState

#: When the transfer worker starts after the resolver: past the node's start-up (``/ready``
#: does not share the CPU with its interpreter start), well before a realistic first
#: download (one that comes sooner starts it itself).
PRESTART_AFTER_S = 1.0


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


class ModelTable:
    """The store's models, the records and manifests of the others; built through
    :class:`~llmlb.node.models.resolver.Resolver` (its arguments are documented there)."""

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

    # -- retries (their bookkeeping; :class:`~.resolver.Resolver` schedules them) ----------

    def _cancel_retry(self, model_id: str) -> None:
        handle = self._retries.pop(model_id, None)
        if handle is not None:
            handle.cancel()

    def _clear_failures(self, model_id: str) -> None:
        self._failures.pop(model_id, None)
        self._cancel_retry(model_id)


def _manifest_format(manifest: Manifest) -> str | None:
    """A manifest's model format, from its ``format`` or else its primary file's name."""
    if manifest.format:
        return manifest.format
    for spec in sorted(manifest.files, key=lambda f: f.priority):
        for suffix in ("gguf", "safetensors"):
            if spec.filename.endswith(f".{suffix}"):
                return suffix
    return None

