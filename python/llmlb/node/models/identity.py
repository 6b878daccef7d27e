"""The node's stable identity, persisted in its model store.

``<models_dir>/.node-id`` maps each advertised URL to a node id (a JSON object), so a node
restarted on the same address keeps its id while two node processes sharing one store (on
different ports) stay distinct.

``<models_dir>/.node-secret`` (mode 0600) maps each node id to its secret, generated once.
The node sends it when it registers and heartbeats; the router keeps only its hash and
binds the id to it, so no other credential can take the id over.
"""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import orjson
from filelock import FileLock

from llmlb.files import atomic_write

NODE_ID_FILENAME = ".node-id"
NODE_SECRET_FILENAME = ".node-secret"


def node_id(models_dir: Path, advertise_url: str) -> str:
    """Return the persisted node id for ``advertise_url``, creating one on first use.

    Args:
        models_dir: root of the node's model store (created if missing).
        advertise_url: the URL the node registers with the router.

    Returns:
        A stable id such as ``node-3f2a…``.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / NODE_ID_FILENAME
    with FileLock(str(path) + ".lock"):
        try:
            ids = orjson.loads(path.read_bytes())
            if not isinstance(ids, dict):
                ids = {}
        except (FileNotFoundError, orjson.JSONDecodeError):
            ids = {}
        existing = ids.get(advertise_url)
        if isinstance(existing, str) and existing:
            return existing
        new_id = f"node-{uuid.uuid4().hex[:16]}"
        ids[advertise_url] = new_id
        atomic_write(path, orjson.dumps(ids, option=orjson.OPT_INDENT_2))
        return new_id


def node_secret(models_dir: Path, node_id: str) -> str:
    """Return the persisted secret of ``node_id``, creating it (0600, atomically) on first use.

    Args:
        models_dir: root of the node's model store (created if missing).
        node_id: the node id the secret belongs to.

    Returns:
        256 random bits, url-safe base64.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / NODE_SECRET_FILENAME
    with FileLock(str(path) + ".lock"):
        try:
            known = orjson.loads(path.read_bytes())
            if not isinstance(known, dict):
                known = {}
        except (FileNotFoundError, orjson.JSONDecodeError):
            known = {}
        existing = known.get(node_id)
        if isinstance(existing, str) and existing:
            return existing
        known[node_id] = secrets.token_urlsafe(32)
        atomic_write(path, orjson.dumps(known, option=orjson.OPT_INDENT_2), private=True)
        return known[node_id]
