"""The node's stable identity, persisted in its model store.

``<models_dir>/.node-id`` maps each advertised URL to a node id (a JSON object), so a node
restarted on the same address keeps its id while two node processes sharing one store (on
different ports) stay distinct.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import orjson
from filelock import FileLock

NODE_ID_FILENAME = ".node-id"


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
        tmp = path.with_name(f"{NODE_ID_FILENAME}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(ids, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)
        return new_id
