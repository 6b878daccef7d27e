"""The node's stable identity, persisted in its model store.

``<models_dir>/.node-id`` maps each advertised URL to a node id (a JSON object), so a node
restarted on the same address keeps its id while two node processes sharing one store (on
different ports) stay distinct.

``<models_dir>/.node-secret`` (mode 0600) maps each node id to its secret, generated once.
The node sends it when it registers and heartbeats; the router keeps only its hash and
binds the id to it, so no other credential can take the id over.

``<models_dir>/.fleet-credential`` (mode 0600) maps each approved node id to the fleet's peer
credential the router handed it, so that ``llmlb pull`` on the node's machine fetches from
the fleet's peers as the node does; an unapproved or revoked node's entry is removed.
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
FLEET_CREDENTIAL_FILENAME = ".fleet-credential"


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


def save_fleet_credential(models_dir: Path, node_id: str, peer_token: str | None) -> None:
    """Record (or, with ``None``, remove) the peer credential ``node_id`` holds."""
    path = models_dir / FLEET_CREDENTIAL_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        known = _read_object(path)
        if known.get(node_id) == peer_token:
            return
        if peer_token is None:
            known.pop(node_id, None)
        else:
            known[node_id] = peer_token
        atomic_write(path, orjson.dumps(known, option=orjson.OPT_INDENT_2), private=True)


def fleet_credential(models_dir: Path) -> tuple[str, str] | None:
    """``(node_id, peer_token)`` of a node of this store that holds the fleet's credential,
    or ``None`` when none does (no node of this machine was approved)."""
    path = models_dir / FLEET_CREDENTIAL_FILENAME
    if not path.exists():
        return None
    with FileLock(str(path) + ".lock"):
        known = _read_object(path)
    for node, token in sorted(known.items()):
        if isinstance(token, str) and token:
            return node, token
    return None


def _read_object(path: Path) -> dict:
    try:
        known = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}
    return known if isinstance(known, dict) else {}


def _persisted(path: Path, key: str, make: Callable[[], str], *, private: bool) -> str:
    """``key``'s value in the JSON object file ``path``, made and added (atomically, under a
    cross-process lock) on first use; an unreadable file counts as empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        known = _read_object(path)
        existing = known.get(key)
        if isinstance(existing, str) and existing:
            return existing
        known[key] = value = make()
        atomic_write(path, orjson.dumps(known, option=orjson.OPT_INDENT_2), private=private)
        return value
