"""``llmlb pull``'s download: a registered model into the local store, node-first, with the
node's own downloader (:mod:`llmlb.node.models.download`). On a machine whose node the
router approved, it fetches from the fleet's peers and the hub piece by piece as that node
would, with the fleet credential the node recorded in the store
(:func:`llmlb.node.models.identity.fleet_credential`); elsewhere from the hub only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmlb import config
from llmlb.errors import RouterUnavailable
from llmlb.node.models.download.fetch import ModelFetch
from llmlb.node.models.download.options import DownloadOptions, ProgressCallback
from llmlb.node.models.identity import fleet_credential, node_secret
from llmlb.node.models.pieces import PieceBoard
from llmlb.node.models.router_client import fetch_manifest, report_peer
from llmlb.protocol import PeerReport, PeerSource


def pull_model(
    model_id: str,
    *,
    router_url: str | None = None,
    api_key: str | None = None,
    models_dir: Path | None = None,
    allowed_hosts: Iterable[str] | None = None,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    options: DownloadOptions | None = None,
) -> Any:
    """Resolve ``model_id`` into the local store, node-first (blocking; used by ``llmlb pull``).

    Args:
        model_id: the model id (normalized with ``normalize_model_id``).
        router_url: router base URL (default ``llmlb.config.router_url()``).
        api_key: a node-scope key for the router (default ``llmlb.config.node_key()``).
        models_dir: store root (default ``llmlb.config.models_dir()``).
        allowed_hosts: download allowlist (default ``llmlb.config.default_allowed_hosts()``).
        token: hub token (default ``llmlb.config.hf_token()``).
        progress: receives ``DownloadProgress`` snapshots.
        options: downloader tuning.

    Returns:
        The store's ``ModelDescriptor`` of the model.

    Raises:
        DownloadError: (or a subclass) naming the model and the reason.
        llmlb.model_storage.InvalidModelId: the id is malformed.
    """
    from llmlb.model_storage import ModelStorage, normalize_model_id

    model_id = normalize_model_id(model_id)
    root = Path(models_dir) if models_dir is not None else config.models_dir()
    root.mkdir(parents=True, exist_ok=True)
    store = ModelStorage(str(root))
    existing = store.resolve(model_id)
    if existing is not None:
        return existing
    router = router_url or config.router_url()
    key = api_key if api_key is not None else config.node_key()
    # On a node's machine, the fleet's peers: as that node, with the credential it holds.
    credential = fleet_credential(root)
    node_id, peer_token = credential if credential is not None else (None, None)

    def peers_now() -> list[PeerSource]:
        listed = fetch_manifest(router, key, model_id, timeout=5.0, node_id=node_id).peers
        return [peer for peer in listed if peer.node_id != node_id]

    manifest = replace(fetch_manifest(router, key, model_id, node_id=node_id), model_id=model_id)

    def bad_peer(peer: PeerSource, reason: str) -> None:
        secret = node_secret(root, node_id) if node_id else None
        with contextlib.suppress(RouterUnavailable):
            report_peer(router, key, PeerReport(model_id, peer.node_id, reason, node_id, secret))

    hosts = list(allowed_hosts) if allowed_hosts is not None else config.default_allowed_hosts()
    fetch = ModelFetch(
        store,
        root,
        manifest,
        allowed_hosts=hosts,
        token=token if token is not None else config.hf_token(),
        progress=progress,
        options=options,
        peers=[peer for peer in manifest.peers if peer.node_id != node_id],
        peer_token=peer_token,
        on_bad_peer=bad_peer,
        board=PieceBoard() if peer_token else None,
        node_id=node_id,
        refresh_peers=peers_now if peer_token else None,
    )
    return fetch.run()
