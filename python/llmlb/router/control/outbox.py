"""The sync outbox: notifications for nodes, queued in the database by whichever router
handled the admin request and delivered by the fleet's leader (:mod:`llmlb.router.control.sync`).

Rows are delivered per node in ``id`` order and deleted once the node accepted them, so a
notification outlives the router that queued it and the leader that was retrying it.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmlb.router import db


def enqueue(conn: db.Conn, node_ids: Iterable[str], body: bytes) -> int:
    """Queue ``body`` for each node; returns how many rows were added."""
    now = db.now_iso()
    rows = [(node_id, body.decode(), now) for node_id in node_ids]
    if not rows:
        return 0
    with db.transaction(conn):
        conn.executemany(
            "INSERT INTO sync_outbox (node_id, body, created_at) VALUES (?, ?, ?)", rows
        )
        db.signal(conn, db.OUTBOX)
    return len(rows)


def pending(conn: db.Conn, after_id: int = 0) -> list[tuple[int, str, bytes]]:
    """``(id, node_id, body)`` of every queued notification past ``after_id``, oldest first."""
    return [
        (row[0], row[1], row[2].encode())
        for row in conn.execute(
            "SELECT id, node_id, body FROM sync_outbox WHERE id > ? ORDER BY id", (after_id,)
        )
    ]


def delete(conn: db.Conn, outbox_id: int) -> None:
    """Forget a delivered notification."""
    conn.execute("DELETE FROM sync_outbox WHERE id = ?", (outbox_id,))


def drop_node(conn: db.Conn, node_id: str) -> int:
    """Forget every notification queued for ``node_id`` (it is gone)."""
    return conn.execute("DELETE FROM sync_outbox WHERE node_id = ?", (node_id,)).rowcount


def count(conn: db.Conn) -> int:
    """Queued notifications (all nodes)."""
    return conn.execute("SELECT COUNT(*) FROM sync_outbox").fetchone()[0]
