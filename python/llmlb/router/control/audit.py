"""The audit log: every admin action, appended with a hash chain.

Each entry records when, which key acted (its id: never a key), the action, its target and
the change (the request's JSON body, the value of every secret field redacted: :func:`scrub`),
and ``hash = sha256(prev_hash + canonical entry)``; the first entry's ``prev_hash`` is
:data:`GENESIS`. ``audit_head`` counts the entries, so
removing the newest ones shows too. :func:`verify` finds a removed, inserted
or altered row; ``llmlb audit verify`` runs it over ``GET /v0/audit``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from llmlb.router import db

GENESIS = "0" * 64
MAX_PAGE = 1000
# A body field is a secret when one word of its name is one of these (words split at any
# non-alphanumeric character and at camelCase humps: ``hf_token``, ``node_secret``,
# ``x-api-key``, ``Authorization``, ``apiKey``; not ``budget_tokens``).
SECRET_WORDS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "authorization",
        "credential",
        "credentials",
        "cookie",
    }
)
REDACTED = "[redacted]"
_HUMP = re.compile(r"([a-z0-9])([A-Z])")
_WORD = re.compile(r"[a-z0-9]+")


def _canonical(entry: dict[str, Any]) -> bytes:
    fields = {k: entry[k] for k in ("seq", "at", "actor", "action", "target", "change")}
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def entry_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """The hash of ``entry`` chained to ``prev_hash``."""
    return hashlib.sha256(prev_hash.encode() + _canonical(entry)).hexdigest()


def is_secret_field(name: str) -> bool:
    """Whether a body field named ``name`` holds a secret (see :data:`SECRET_WORDS`)."""
    return not SECRET_WORDS.isdisjoint(_WORD.findall(_HUMP.sub(r"\1_\2", name).lower()))


def scrub(change: Any) -> Any:
    """``change`` with the value of every secret field (:func:`is_secret_field`, at any
    depth) replaced by :data:`REDACTED`: the entry shows that one was sent, never what."""
    if isinstance(change, dict):
        return {k: REDACTED if is_secret_field(k) else scrub(v) for k, v in change.items()}
    if isinstance(change, list):
        return [scrub(v) for v in change]
    return change


def append(conn: db.Conn, actor: str, action: str, target: str, change: Any) -> dict[str, Any]:
    """Append one entry (serialised with every writer: the chain has no forks)."""
    with db.transaction(conn):
        last = conn.execute(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        seq, prev = (1, GENESIS) if last is None else (int(last[0]) + 1, last[1])
        entry = {
            "seq": seq,
            "at": db.now_iso(),
            "actor": actor,
            "action": action,
            "target": target,
            "change": scrub(change),
        }
        digest = entry_hash(prev, entry)
        conn.execute(
            "INSERT INTO audit_log (seq, at, actor, action, target, change, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                seq,
                entry["at"],
                actor,
                action,
                target,
                orjson.dumps(entry["change"]).decode(),
                prev,
                digest,
            ),
        )
        conn.execute("UPDATE audit_head SET entries = ? WHERE id = 1", (seq,))
    return {**entry, "prev_hash": prev, "hash": digest}


def read(conn: db.Conn, after: int = 0, limit: int = MAX_PAGE) -> tuple[list[dict], int]:
    """Entries with ``seq > after``, oldest first, and the recorded count of entries."""
    rows = conn.execute(
        "SELECT seq, at, actor, action, target, change, prev_hash, hash FROM audit_log "
        "WHERE seq > ? ORDER BY seq LIMIT ?",
        (after, min(limit, MAX_PAGE)),
    ).fetchall()
    count = conn.execute("SELECT entries FROM audit_head WHERE id = 1").fetchone()
    entries = [
        {
            "seq": int(row[0]),
            "at": row[1],
            "actor": row[2],
            "action": row[3],
            "target": row[4],
            "change": orjson.loads(row[5]),
            "prev_hash": row[6],
            "hash": row[7],
        }
        for row in rows
    ]
    return entries, int(count[0]) if count else 0


def verify(entries: list[dict[str, Any]], count: int) -> list[str]:
    """Problems of a whole log (oldest first) whose writer recorded ``count`` entries: each
    altered, removed or inserted row; an empty list when the chain holds."""
    problems = []
    prev = GENESIS
    expected = 1
    for entry in entries:
        seq = entry.get("seq")
        if seq != expected:
            problems.append(f"entry {expected} is missing (next is {seq})")
            expected = seq if isinstance(seq, int) else expected
        if entry.get("prev_hash") != prev:
            problems.append(f"entry {seq}: does not follow the entry before it")
        if entry_hash(entry.get("prev_hash") or "", entry) != entry.get("hash"):
            problems.append(f"entry {seq}: altered (its hash does not match its content)")
        prev = entry.get("hash") or ""
        expected += 1
    if expected - 1 < count:
        problems.append(f"the log ends at entry {expected - 1} but {count} were written")
    return problems
