"""Node registry: registrations and heartbeats (bodies: :mod:`llmlb.protocol`), their
storage, node credentials, enrollment (approval), offline detection, and the reports nodes
make of peers that served bad bytes.

Enrollment: a node id the router has never approved joins ``pending`` (``approved_at``
NULL) unless the router approves nodes automatically (``--node-approval auto``). A pending
node heartbeats and reads the registry like any node, but it is not in the fleet view (no
client traffic, no sync notifications), gets no peer token and is in nobody's peer list, and
its peer reports count for nothing. Approval belongs to the credential the id is bound to:
it survives restarts and re-registrations with that credential, and goes with the row when
an admin removes the node.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import orjson

from llmlb.errors import ApiError
from llmlb.protocol import Approval, Heartbeat, PeerReport, Registration, transfer_totals
from llmlb.router import db
from llmlb.router.control.fleet import ModelReport, NodeState, NodeView
from llmlb.router.control.peers import NodeModels

APPROVED = Approval.APPROVED.value
PENDING = Approval.PENDING.value


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


def _state_key(models: list[dict]) -> list[tuple[str, str, bool, str]]:
    """What of a model list the fleet cache cares about."""
    return sorted(
        (m["id"], m["state"], m.get("servable", True), m.get("revision") or "") for m in models
    )


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a registration gave the node: its fresh sync token, and whether it is approved."""

    token: str
    approved: bool

    @property
    def approval(self) -> str:
        """``approved`` or ``pending``."""
        return APPROVED if self.approved else PENDING


def register(conn: db.Conn, reg: Registration, key: bytes | None = None) -> str:
    """:func:`enroll` with the router's default (manual approval); returns the sync token."""
    return enroll(conn, reg, key).token


def enroll(
    conn: db.Conn, reg: Registration, key: bytes | None = None, *, auto_approve: bool = False
) -> Enrollment:
    """Insert or replace a node with a fresh sync token.

    The id is bound to the registration's credential (its ``node_secret``, else ``key``, the
    request's bearer key); registering a bound id again needs the same credential, and keeps
    the id's approval. A new id (or one bound to nothing yet) is approved only with
    ``auto_approve``; else it is pending until :func:`approve`.

    Raises:
        ApiError: 409 ``node_id_conflict`` when the id is bound to another credential.
    """
    token = secrets.token_urlsafe(32)
    credential = Credential(reg.node_secret, key)
    with db.transaction(conn):
        row = conn.execute(
            "SELECT credential_hash, approved_at FROM nodes WHERE id = ?", (reg.node_id,)
        ).fetchone()
        if row is not None and not credential.proves(row[0]):
            raise id_conflict(reg.node_id)
        # Approval was given to the bound credential; an unbound row's is not inherited.
        approved_at = row[1] if row is not None and row[0] is not None else None
        if approved_at is None and auto_approve:
            approved_at = db.now_iso()
        conn.execute(
            "INSERT INTO nodes (id, url, runtimes, gpu, slots, sync_token, status, models, "
            "active_requests, registered_at, last_seen, credential_hash, approved_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'online', ?, 0, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET url=excluded.url, runtimes=excluded.runtimes, "
            "gpu=excluded.gpu, slots=excluded.slots, sync_token=excluded.sync_token, "
            "status='online', models=excluded.models, active_requests=0, "
            "registered_at=excluded.registered_at, last_seen=excluded.last_seen, "
            "credential_hash=excluded.credential_hash, approved_at=excluded.approved_at",
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
                approved_at,
            ),
        )
        db.bump(conn, db.FLEET)
    return Enrollment(token, approved_at is not None)


def heartbeat(
    conn: db.Conn, node_id: str, beat: Heartbeat, key: bytes | None = None
) -> bool:
    """:func:`record_heartbeat`; ``False`` when the node is not registered."""
    return record_heartbeat(conn, node_id, beat, key) is not None


def record_heartbeat(
    conn: db.Conn,
    node_id: str,
    beat: Heartbeat,
    key: bytes | None = None,
    *,
    auto_approve: bool = False,
) -> bool | None:
    """Record a heartbeat; returns whether the node is approved (``None``: not registered).

    The heartbeat must present the credential the id is bound to (its ``node_secret``, else
    ``key``, the request's bearer key), so only the node that registered speaks for it. With
    ``auto_approve``, a pending node is approved (a router switched to ``auto``).

    Raises:
        ApiError: 409 ``node_id_conflict`` when the id is bound to another credential (its
            registration changed: the node should register again).
    """
    with db.transaction(conn):
        row = conn.execute(
            "SELECT status, models, slots, runtimes, credential_hash, approved_at "
            "FROM nodes WHERE id = ?",
            (node_id,),
        ).fetchone()
        if row is None:
            return None
        if not Credential(beat.node_secret, key).proves(row["credential_hash"]):
            raise id_conflict(node_id)
        approved = row["approved_at"] is not None
        newly_approved = not approved and auto_approve
        old_models = orjson.loads(row["models"])
        models = beat.models if beat.models is not None else old_models
        slots = beat.slots if beat.slots is not None else row["slots"]
        runtimes = orjson.dumps(beat.runtimes).decode() if beat.runtimes is not None else None
        runtimes = runtimes or row["runtimes"]
        conn.execute(
            "UPDATE nodes SET status='online', models=?, slots=?, runtimes=?, active_requests=?, "
            "last_seen=?, approved_at=? WHERE id = ?",
            (
                orjson.dumps(models).decode(),
                slots,
                runtimes,
                beat.active_requests,
                db.unix_now(),
                db.now_iso() if newly_approved else row["approved_at"],
                node_id,
            ),
        )
        if (
            newly_approved
            or row["status"] != "online"
            or slots != row["slots"]
            or runtimes != row["runtimes"]
            or _state_key(models) != _state_key(old_models)
        ):
            db.bump(conn, db.FLEET)
    return approved or newly_approved


def approve(conn: db.Conn, node_id: str) -> bool:
    """Approve a node (idempotent): it joins the fleet view, the peer lists, and gets the peer
    token with its next heartbeat. ``False`` when the node is not registered."""
    return _set_approval(conn, node_id, "approved_at IS NULL", db.now_iso())


def revoke(conn: db.Conn, node_id: str) -> bool:
    """Make an approved node pending again (idempotent): out of the fleet view and the peer
    lists at once, its reports no longer count. ``False`` when the node is not registered.
    (The peer token it already holds stays valid: the fleet's secret must change for that.)"""
    return _set_approval(conn, node_id, "approved_at IS NOT NULL", None)


def _set_approval(conn: db.Conn, node_id: str, unless: str, approved_at: str | None) -> bool:
    """Set the node's ``approved_at`` where ``unless`` holds; whether the node exists."""
    with db.transaction(conn):
        sql = f"UPDATE nodes SET approved_at = ? WHERE id = ? AND {unless}"
        if _change_fleet(conn, sql, (approved_at, node_id)):
            return True
        return conn.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is not None


def _change_fleet(conn: db.Conn, sql: str, params: tuple = ()) -> int:
    """Run the ``UPDATE`` ``sql`` (in the caller's transaction) and tell every worker the
    fleet changed when it changed a row; returns the rows changed."""
    changed = conn.execute(sql, params).rowcount
    if changed:
        db.bump(conn, db.FLEET)
    return changed


def unregister(
    conn: db.Conn, node_id: str, key: bytes | None = None, *, force: bool = False
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
            conn.execute("DELETE FROM sync_outbox WHERE node_id = ?", (node_id,))
            conn.execute(
                "DELETE FROM peer_reports WHERE node_id = ? OR reporter = ?", (node_id, node_id)
            )
            db.bump(conn, db.FLEET)
    return bool(deleted)


def mark_offline(conn: db.Conn, node_id: str) -> None:
    """Mark one node offline (until its next heartbeat)."""
    with db.transaction(conn):
        _change_fleet(
            conn, "UPDATE nodes SET status='offline' WHERE id = ? AND status='online'", (node_id,)
        )


def mark_all_offline(conn: db.Conn) -> int:
    """Mark every node offline; run once at the start of a router with its own database.

    Nodes heard by an earlier router process may be gone; each live node turns online
    again with its next heartbeat, so nothing stale is ever routed to. (A router joining a
    shared database runs :func:`reap` instead: the other routers' nodes are live.)
    """
    with db.transaction(conn):
        return _change_fleet(conn, "UPDATE nodes SET status='offline' WHERE status='online'")


def reap(conn: db.Conn, offline_after_s: float) -> int:
    """Mark offline every online node silent for longer than ``offline_after_s``."""
    cutoff = db.unix_now() - offline_after_s
    with db.transaction(conn):
        return _change_fleet(
            conn,
            "UPDATE nodes SET status='offline' WHERE status='online' AND last_seen < ?",
            (cutoff,),
        )


def sync_target(conn: db.Conn, node_id: str) -> tuple[str, str] | None:
    """``(url, sync_token)`` of a registered node, or ``None``."""
    row = conn.execute("SELECT url, sync_token FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return (row[0], row[1]) if row else None


def load_states(conn: db.Conn) -> list[NodeState]:
    """Every node in the form the fleet cache holds (pending ones too: the cache leaves
    them out)."""
    states = []
    query = (
        "SELECT id, url, slots, status, models, sync_token, runtimes, active_requests, "
        "approved_at, credential_hash FROM nodes"
    )
    for row in conn.execute(query):
        models = {
            m["id"]: ModelReport(
                m["state"], m.get("format"), m.get("size_bytes"), m.get("servable", True)
            )
            for m in orjson.loads(row["models"])
        }
        view = NodeView(
            row["id"], row["url"], row["slots"], row["sync_token"], row["active_requests"]
        )
        runtimes = tuple(orjson.loads(row["runtimes"]))
        approved = row["approved_at"] is not None
        states.append(
            NodeState(
                view,
                row["status"] == "online",
                models,
                runtimes,
                approved,
                row["credential_hash"],
            )
        )
    return states


def list_nodes(conn: db.Conn, offline_after_s: float) -> list[dict]:
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
                "models": (models := orjson.loads(row["models"])),
                "transfer": transfer_totals(models),
                "registered_at": row["registered_at"],
                "last_seen": db.iso_from_unix(row["last_seen"]),
                "approval": PENDING if row["approved_at"] is None else APPROVED,
                "approved_at": row["approved_at"],
            }
        )
    return nodes


def peer_view(conn: db.Conn, offline_after_s: float) -> list[NodeModels]:
    """Every node with its last reported models, for a manifest's peer list."""
    cutoff = db.unix_now() - offline_after_s
    return [
        NodeModels(
            row["id"],
            row["url"],
            row["status"] == "online" and row["last_seen"] >= cutoff,
            {m["id"]: m for m in orjson.loads(row["models"])},
            approved=row["approved_at"] is not None,
        )
        for row in conn.execute(
            "SELECT id, url, status, last_seen, models, approved_at FROM nodes"
        )
    ]


def record_peer_report(conn: db.Conn, report: PeerReport, key: bytes | None = None) -> bool:
    """Store a report that ``report.node_id`` served bad bytes; returns whether it counts.

    It counts when it names its ``reporter``, an approved node other than the peer, and
    proves to speak for it (the reporter's ``node_secret``, else ``key``, as heartbeats do).
    A report that counts for nothing (no reporter, a pending or unknown one, the peer itself)
    is not stored.

    Raises:
        ApiError: 409 ``node_id_conflict`` when the reporter is bound to another credential.
    """
    if report.reporter is None or report.reporter == report.node_id:
        return False
    with db.transaction(conn):
        row = conn.execute(
            "SELECT credential_hash, approved_at FROM nodes WHERE id = ?", (report.reporter,)
        ).fetchone()
        if row is None:
            return False
        if not Credential(report.node_secret, key).proves(row[0]):
            raise id_conflict(report.reporter)
        if row[1] is None:
            return False
        conn.execute(
            "INSERT INTO peer_reports (model_id, node_id, reporter, reason, created_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(model_id, node_id, reporter) DO UPDATE SET "
            "reason=excluded.reason, created_at=excluded.created_at",
            (report.model_id, report.node_id, report.reporter, report.reason, db.now_iso()),
        )
    return True


def peer_reports(conn: db.Conn, model_id: str) -> list[tuple[str, str]]:
    """``(peer, reporter)`` of every report of ``model_id`` whose reporter is approved now."""
    return [
        (row[0], row[1])
        for row in conn.execute(
            "SELECT r.node_id, r.reporter FROM peer_reports r JOIN nodes n ON n.id = r.reporter "
            "WHERE r.model_id = ? AND n.approved_at IS NOT NULL",
            (model_id,),
        )
    ]
