"""The node's parts wired together: store, resolver, engine, router sync, peer route.

The resolver owns model state; the engine and the sync loop subscribe to what it
announces (:mod:`llmlb.node.events`), and the id and peer credential the router hands out
live in one :class:`~llmlb.node.models.membership.Membership` the parts share, so no part holds a
callback into another that holds one back.
"""

from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import Future
from typing import Any

from llmlb.model_storage import ModelStorage
from llmlb.node.fleet.cache_reports import CacheReporter
from llmlb.node.fleet.sync import RouterSync
from llmlb.node.inference.engine import Engine
from llmlb.node.metrics import NodeMetrics
from llmlb.node.models.identity import node_id as persistent_node_id
from llmlb.node.models.membership import Membership
from llmlb.node.models.peers import PeerService, TransferStats
from llmlb.node.models.resolver import Resolver, RouterAccess
from llmlb.node.settings import NodeSettings

logger = logging.getLogger(__name__)


class Node:
    """One node process's components (built once per server process)."""

    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self.metrics = NodeMetrics()
        models_dir = settings.models_dir
        models_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStorage(str(models_dir))
        router = (
            RouterAccess(settings.router_url, settings.api_key) if settings.router_url else None
        )
        self.membership = Membership(persistent_node_id(models_dir, settings.url))
        self.node_id = self.membership.node_id
        self.resolver = Resolver(
            self.store,
            models_dir,
            router,
            self.metrics,
            allowed_hosts=list(settings.allowed_hosts),
            token=settings.hf_token,
            options=settings.download,
            store_all=settings.store_all,
            fleet=self.membership.fleet,
            peer_fetch=settings.peer_fetch,
            stats=TransferStats(self.metrics.registry),
        )
        self.engine = Engine(
            self.store,
            self.metrics,
            settings.engine,
            template_lookup=self.resolver.template_for,
        )
        self.gpu = GpuProbe()
        self.sync = RouterSync(
            settings,
            self.node_id,
            self.resolver,
            self.engine,
            gpu=self.gpu.result,
            membership=self.membership,
        )
        self.cache_reports = CacheReporter(
            settings.router_url,
            settings.api_key,
            self.membership,
            self.sync.node_secret,
            self.engine.directory,
            keepalive_s=lambda: self.sync.interval,
        )
        self.resolver.downloaded.subscribe(self.engine.load)
        self.resolver.load_during_hash(self.engine.load, self.engine.unload)
        self.resolver.changed.subscribe(self.sync.kick)
        self.peer = PeerService(
            self.resolver, self.membership.token, settings.peer_upload_mbps, self.resolver.stats
        )

    async def start(self) -> None:
        """Start syncing with the router (in the background)."""
        await self.sync.start()
        await self.cache_reports.start()

    async def stop(self) -> None:
        """Stop syncing, cancel downloads, unload models."""
        await self.cache_reports.close()
        await self.sync.close()
        await self.resolver.close()
        await self.engine.close()


class GpuProbe:
    """Import llama.cpp and ask it about GPU offload, in a background thread started at once.

    The import costs a noticeable part of a second; doing it off the start-up path keeps
    ``/ready`` fast, and the first inference request finds the module already imported.
    """

    def __init__(self) -> None:
        self._future: Future[dict[str, Any]] = Future()
        threading.Thread(target=self._probe, name="llama-import", daemon=True).start()

    def _probe(self) -> None:
        try:
            from llmlb.node.inference.engine import gpu_offload_supported

            gpu = gpu_offload_supported()
            info = {"backend": ("metal" if sys.platform == "darwin" else "cuda") if gpu else "cpu"}
        except Exception as exc:  # noqa: BLE001 - reported as CPU; loading will say more
            logger.warning("llama.cpp probe failed: %s", exc)
            info = {"backend": "cpu"}
        self._future.set_result(info)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The registration's ``gpu`` object (blocks until the probe finished)."""
        return self._future.result(timeout)
