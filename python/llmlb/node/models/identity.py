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
from collections.abc import Callable
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
    return _persisted(
        models_dir / NODE_ID_FILENAME,
        advertise_url,
        lambda: f"node-{uuid.uuid4().hex[:16]}",
        private=False,
    )


def node_secret(models_dir: Path, node_id: str) -> str:
    """Return the persisted secret of ``node_id``, creating it (0600, atomically) on first use.

    Args:
        models_dir: root of the node's model store (created if missing).
        node_id: the node id the secret belongs to.

    Returns:
        256 random bits, url-safe base64.
    """
    return _persisted(
        models_dir / NODE_SECRET_FILENAME, node_id, lambda: secrets.token_urlsafe(32), private=True
    )


def _persisted(path: Path, key: str, make: Callable[[], str], *, private: bool) -> str:
    """``key``'s value in the JSON object file ``path``, made and added (atomically, under a
    cross-process lock) on first use; an unreadable file counts as empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            known = orjson.loads(path.read_bytes())
            if not isinstance(known, dict):
                known = {}
        except (FileNotFoundError, orjson.JSONDecodeError):
            known = {}
        existing = known.get(key)
        if isinstance(existing, str) and existing:
            return existing
        known[key] = value = make()
        atomic_write(path, orjson.dumps(known, option=orjson.OPT_INDENT_2), private=private)
        return value
