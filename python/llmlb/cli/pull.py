"""``llmlb pull``'s download: a registered model into the local store, node-first, with the
node's own downloader (:mod:`llmlb.node.models.download`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmlb import config
from llmlb.node.models.download.fetch import ModelFetch
from llmlb.node.models.download.options import DownloadOptions, ProgressCallback
from llmlb.node.models.router_client import fetch_manifest


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
    manifest = fetch_manifest(
        router_url or config.router_url(),
        api_key if api_key is not None else config.node_key(),
        model_id,
    )
    manifest = replace(manifest, model_id=model_id)
    hosts = list(allowed_hosts) if allowed_hosts is not None else config.default_allowed_hosts()
    fetch = ModelFetch(
        store,
        root,
        manifest,
        allowed_hosts=hosts,
        token=token if token is not None else config.hf_token(),
        progress=progress,
        options=options,
    )
    return fetch.run()
