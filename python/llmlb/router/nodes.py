"""Node registry: registration and heartbeat payloads, their storage, and offline detection."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from llmlb.errors import ApiError
from llmlb.model_storage import InvalidModelId, normalize_model_id
from llmlb.router import db
from llmlb.router.fleet import MODEL_STATES, ModelReport, NodeState, NodeView

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_NODE_SECRET = re.compile(r"[\x21-\x7e]{16,256}")
MAX_COUNT = 1_000_000  # bound on slots and active requests
MAX_BYTES = 1 << 60  # bound on sizes and progress


def _bad(message: str, code: str = "invalid_request_error") -> ApiError:
    return ApiError(400, code, message)


def validate_node_id(value: Any) -> str:
    """A node id: 1-128 characters of ``[A-Za-z0-9._:-]``, starting alphanumeric."""
    if not isinstance(value, str) or not _NODE_ID.fullmatch(value):
        raise _bad("node_id must be 1-128 characters of [A-Za-z0-9._:-]", "invalid_node_id")
    return value


def validate_node_secret(value: Any) -> str | None:
    """An optional ``node_secret``: 16-256 printable ASCII characters, no spaces."""
    if value is None:
        return None
    if not isinstance(value, str) or not _NODE_SECRET.fullmatch(value):
        raise _bad("node_secret must be 16-256 printable ASCII characters without spaces")
    return value


@dataclass(frozen=True, slots=True)
class Credential:
    """What a request presents to prove it speaks for a node id.

    The node's own ``node_secret`` when sent (real nodes always send it), else the bearer key
    of the request: a client that sends no secret binds the id to its key.
    """

    node_secret: str | None
    key: bytes | None

    def digest(self) -> str | None:
        """Hex sha256 of the credential (the only form stored), ``None`` when there is none."""
        if self.node_secret is not None:
            return hashlib.sha256(self.node_secret.encode()).hexdigest()
        if self.key:
            return hashlib.sha256(self.key).hexdigest()
        return None

    def proves(self, bound: str | None) -> bool:
        """Whether this credential is the one ``bound`` (a stored digest) was made from.

        A row without a binding (written before bindings existed) accepts anyone.
        """
        if bound is None:
            return True
        digest = self.digest()
        return digest is not None and hmac.compare_digest(digest, bound)


def id_conflict(node_id: str) -> ApiError:
    """409 ``node_id_conflict``: the id is bound to another credential."""
    return ApiError(
        409,
        "node_id_conflict",
        f"node id {node_id} is registered by another node (a different node_secret or key); "
        f"an admin must remove it first (DELETE /v0/nodes/{node_id})",
    )


def validate_url(value: Any) -> str:
    """An ``http(s)://host[:port][/path]`` URL, without a trailing slash."""
    if not isinstance(value, str):
        raise _bad("url must be a string")
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise _bad("url has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise _bad("url must look like http://host:port")
    return value.rstrip("/")


def _int(value: Any, name: str, minimum: int, maximum: int = MAX_COUNT) -> int:
    """An integer in ``[minimum, maximum]``; integral floats such as ``4.0`` count as integers."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _bad(f"{name} must be an integer in [{minimum}, {maximum}]")
    return value


def _optional_int(value: Any, name: str) -> int | None:
    return None if value is None else _int(value, name, 0, MAX_BYTES)


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    return value


def parse_model_reports(value: Any) -> list[dict]:
    """Validate a node's ``models`` list into stored form.

    Each item is ``{"id", "state": ready|downloading|loading|failed, "progress"?:
    {"bytes", "total"}, "error"?, "format"?, "size_bytes"?, "servable"?, "attempts"?,
    "retry_at"? (unix seconds)}`` (``status`` is accepted for
    ``state``; a bare string means a ready model).
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("models must be a list")
    reports: dict[str, dict] = {}
    for item in value:
        if isinstance(item, str):
            item = {"id": item, "state": "ready"}
        if not isinstance(item, dict):
            raise _bad("each entry of models must be an object")
        raw_id = item.get("id")
        if not isinstance(raw_id, str):
            raise _bad("each model needs a string id")
        try:
            model_id = normalize_model_id(raw_id)
        except InvalidModelId as exc:
            raise _bad(str(exc), "invalid_model_id") from None
        state = item.get("state", item.get("status", "ready"))
        if state not in MODEL_STATES:
            raise _bad(f"model state must be one of {', '.join(MODEL_STATES)}")
        report: dict[str, Any] = {"id": model_id, "state": state}
        progress = item.get("progress")
        if progress is not None:
            if not isinstance(progress, dict):
                raise _bad("progress must be an object {bytes, total}")
            report["progress"] = {
                "bytes": _optional_int(progress.get("bytes"), "progress.bytes"),
                "total": _optional_int(progress.get("total"), "progress.total"),
            }
        for name in ("error", "format"):
            if (text := _optional_str(item.get(name), name)) is not None:
                report[name] = text
        if (size := _optional_int(item.get("size_bytes"), "size_bytes")) is not None:
            report["size_bytes"] = size
        servable = item.get("servable")
        if servable is not None:
            if not isinstance(servable, bool):
                raise _bad("servable must be a boolean")
            report["servable"] = servable
        for name in ("attempts", "retry_at"):  # a failed download's retries (node's backoff)
            if (number := _optional_int(item.get(name), name)) is not None:
                report[name] = number
        reports[model_id] = report
    return list(reports.values())


@dataclass(frozen=True, slots=True)
class Registration:
    """A validated ``POST /v0/nodes`` body."""

    node_id: str
    url: str
    runtimes: list[str]
    gpu: dict
    slots: int
    models: list[dict]
    node_secret: str | None = None

    @classmethod
    def parse(cls, body: dict) -> Registration:
        """Validate a registration body.

        Raises:
            ApiError: 400 naming the bad field.
        """
        node_id = body.get("node_id")
        node_id = validate_node_id(node_id) if node_id is not None else _generated_id()
        runtimes = _runtimes(body.get("runtimes", []))
        gpu = body.get("gpu", {})
        if gpu is None:
            gpu = {}
        if not isinstance(gpu, dict):
            raise _bad("gpu must be an object")
        return cls(
            node_id=node_id,
            url=validate_url(body.get("url")),
            runtimes=runtimes,
            gpu=gpu,
            slots=_int(body.get("slots", 1), "slots", 1),
            models=parse_model_reports(body.get("models")),
            node_secret=validate_node_secret(body.get("node_secret")),
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A validated heartbeat body; ``None`` fields keep their stored value."""

    models: list[dict] | None
    active_requests: int
    slots: int | None
    runtimes: list[str] | None = None
    node_secret: str | None = None

    @classmethod
    def parse(cls, body: dict) -> Heartbeat:
        """Validate a heartbeat body.

        Raises:
            ApiError: 400 naming the bad field.
        """
        models = body.get("models")
        slots = body.get("slots")
        active = body.get("active_requests")
        return cls(
            models=parse_model_reports(models) if models is not None else None,
            active_requests=_int(active, "active_requests", 0) if active is not None else 0,
            slots=_int(slots, "slots", 1) if slots is not None else None,
            runtimes=_runtimes(body["runtimes"]) if body.get("runtimes") is not None else None,
            node_secret=validate_node_secret(body.get("node_secret")),
        )


def _runtimes(value: Any) -> list[str]:
    """A ``runtimes`` list (e.g. ``["llama.cpp"]``)."""
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise _bad("runtimes must be a list of strings")
    return value


def _generated_id() -> str:
    return "node-" + secrets.token_hex(6)


def _state_key(models: list[dict]) -> list[tuple[str, str]]:
    """What of a model list the fleet cache cares about."""
    return sorted((m["id"], m["state"], m.get("servable", True)) for m in models)


def register(conn: sqlite3.Connection, reg: Registration, key: bytes | None = None) -> str:
    """Insert or replace a node with a fresh sync token; returns the token.

    The id is bound to the registration's credential (its ``node_secret``, else ``key``, the
    request's bearer key); registering a bound id again needs the same credential.

    Raises:
        ApiError: 409 ``node_id_conflict`` when the id is bound to another credential.
    """
    token = secrets.token_urlsafe(32)
    credential = Credential(reg.node_secret, key)
    with db.transaction(conn):
        row = conn.execute(
            "SELECT credential_hash FROM nodes WHERE id = ?", (reg.node_id,)
        ).fetchone()
        if row is not None and not credential.proves(row[0]):
            raise id_conflict(reg.node_id)
        conn.execute(
            "INSERT INTO nodes (id, url, runtimes, gpu, slots, sync_token, status, models, "
            "active_requests, registered_at, last_seen, credential_hash) "
            "VALUES (?, ?, ?, ?, ?, ?, 'online', ?, 0, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET url=excluded.url, runtimes=excluded.runtimes, "
            "gpu=excluded.gpu, slots=excluded.slots, sync_token=excluded.sync_token, "
            "status='online', models=excluded.models, active_requests=0, "
            "registered_at=excluded.registered_at, last_seen=excluded.last_seen, "
            "credential_hash=excluded.credential_hash",
            (
                reg.node_id,
                reg.url,
                orjson.dumps(reg.runtimes).decode(),
                orjson.dumps(reg.gpu).decode(),
                reg.slots,
                token,
                orjson.dumps(reg.models).decode(),
                db.now_iso(),
                db.unix_now(),
                credential.digest(),
            ),
        )
        db.bump(conn, db.FLEET)
    return token


def heartbeat(
    conn: sqlite3.Connection, node_id: str, beat: Heartbeat, key: bytes | None = None
) -> bool:
    """Record a heartbeat; ``False`` when the node is not registered.

    The heartbeat must present the credential the id is bound to (its ``node_secret``, else
    ``key``, the request's bearer key), so only the node that registered speaks for it.

    Raises:
        ApiError: 409 ``node_id_conflict`` when the id is bound to another credential (its
            registration changed: the node should register again).
    """
    with db.transaction(conn):
        row = conn.execute(
            "SELECT status, models, slots, runtimes, credential_hash FROM nodes WHERE id = ?",
            (node_id,),
        ).fetchone()
        if row is None:
            return False
        if not Credential(beat.node_secret, key).proves(row["credential_hash"]):
            raise id_conflict(node_id)
        old_models = orjson.loads(row["models"])
        models = beat.models if beat.models is not None else old_models
        slots = beat.slots if beat.slots is not None else row["slots"]
        runtimes = orjson.dumps(beat.runtimes).decode() if beat.runtimes is not None else None
        runtimes = runtimes or row["runtimes"]
        conn.execute(
            "UPDATE nodes SET status='online', models=?, slots=?, runtimes=?, active_requests=?, "
            "last_seen=? WHERE id = ?",
            (
                orjson.dumps(models).decode(),
                slots,
                runtimes,
                beat.active_requests,
                db.unix_now(),
                node_id,
            ),
        )
        if (
            row["status"] != "online"
            or slots != row["slots"]
            or runtimes != row["runtimes"]
            or _state_key(models) != _state_key(old_models)
        ):
            db.bump(conn, db.FLEET)
    return True


def unregister(
    conn: sqlite3.Connection, node_id: str, key: bytes | None = None, *, force: bool = False
) -> bool:
    """Forget a node; ``False`` when it was not registered.

    Without ``force`` (an admin), ``key`` must be the credential the id is bound to.

    Raises:
        ApiError: 409 ``node_id_conflict`` when it is not.
    """
    with db.transaction(conn):
        row = conn.execute("SELECT credential_hash FROM nodes WHERE id = ?", (node_id,)).fetchone()
        if row is None:
            return False
        if not force and not Credential(None, key).proves(row[0]):
            raise id_conflict(node_id)
        deleted = conn.execute("DELETE FROM nodes WHERE id = ?", (node_id,)).rowcount
        if deleted:
            db.bump(conn, db.FLEET)
    return bool(deleted)


def mark_offline(conn: sqlite3.Connection, node_id: str) -> None:
    """Mark one node offline (until its next heartbeat)."""
    with db.transaction(conn):
        changed = conn.execute(
            "UPDATE nodes SET status='offline' WHERE id = ? AND status='online'", (node_id,)
        ).rowcount
        if changed:
            db.bump(conn, db.FLEET)


def mark_all_offline(conn: sqlite3.Connection) -> int:
    """Mark every node offline; run once at router start-up.

    Nodes heard by an earlier router process may be gone; each live node turns online
    again with its next heartbeat, so nothing stale is ever routed to.
    """
    with db.transaction(conn):
        changed = conn.execute("UPDATE nodes SET status='offline' WHERE status='online'").rowcount
        if changed:
            db.bump(conn, db.FLEET)
    return changed


def reap(conn: sqlite3.Connection, offline_after_s: float) -> int:
    """Mark offline every online node silent for longer than ``offline_after_s``."""
    cutoff = db.unix_now() - offline_after_s
    with db.transaction(conn):
        changed = conn.execute(
            "UPDATE nodes SET status='offline' WHERE status='online' AND last_seen < ?",
            (cutoff,),
        ).rowcount
        if changed:
            db.bump(conn, db.FLEET)
    return changed


def sync_target(conn: sqlite3.Connection, node_id: str) -> tuple[str, str] | None:
    """``(url, sync_token)`` of a registered node, or ``None``."""
    row = conn.execute("SELECT url, sync_token FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return (row[0], row[1]) if row else None


def load_states(conn: sqlite3.Connection) -> list[NodeState]:
    """Every node in the form the fleet cache holds."""
    states = []
    query = "SELECT id, url, slots, status, models, sync_token, runtimes FROM nodes"
    for row in conn.execute(query):
        models = {
            m["id"]: ModelReport(
                m["state"], m.get("format"), m.get("size_bytes"), m.get("servable", True)
            )
            for m in orjson.loads(row["models"])
        }
        view = NodeView(row["id"], row["url"], row["slots"], row["sync_token"])
        runtimes = tuple(orjson.loads(row["runtimes"]))
        states.append(NodeState(view, row["status"] == "online", models, runtimes))
    return states


def list_nodes(conn: sqlite3.Connection, offline_after_s: float) -> list[dict]:
    """Every node for ``GET /v0/nodes`` (never the sync token)."""
    cutoff = db.unix_now() - offline_after_s
    nodes = []
    for row in conn.execute("SELECT * FROM nodes ORDER BY id"):
        online = row["status"] == "online" and row["last_seen"] >= cutoff
        nodes.append(
            {
                "node_id": row["id"],
                "url": row["url"],
                "status": "online" if online else "offline",
                "runtimes": orjson.loads(row["runtimes"]),
                "gpu": orjson.loads(row["gpu"]),
                "slots": row["slots"],
                "active_requests": row["active_requests"],
                "models": orjson.loads(row["models"]),
                "registered_at": row["registered_at"],
                "last_seen": db.iso_from_unix(row["last_seen"]),
            }
        )
    return nodes
