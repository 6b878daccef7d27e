"""API keys: generation, hashing, storage, admin bootstrap and the in-memory auth cache.

Keys look like ``sk-<43 url-safe chars>``; only their sha256 is stored. A key has one
scope: ``api`` (inference, ``GET /v1/models``), ``node`` (the ``/v0`` node routes) or
``admin`` (everything).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlb.errors import ApiError
from llmlb.http import api_key
from llmlb.private_file import write_private_file
from llmlb.router import db
from llmlb.router.control.limits import NO_LIMITS, KeyLimits, parse_limits

logger = logging.getLogger("llmlb.router")

SCOPES = ("api", "node", "admin")
KEY_PREFIX = "sk-"
ADMIN_KEY_FILE = "admin.key"
# Row id of the admin key fixed by LLMLB_ADMIN_KEY (its hash is replaced at each start).
ENV_ADMIN_KEY_ID = "key_admin_env"

# Outcomes of KeyCache.check: None means allowed.
UNAUTHENTICATED = 401
FORBIDDEN = 403


def generate_key() -> str:
    """A fresh random key, ``sk-`` followed by 256 bits of url-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str | bytes) -> str:
    """Hex sha256 of a key, the only form stored."""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def _display_prefix(key: str) -> str:
    return key[:7] + "..."


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A stored key, without the secret."""

    id: str
    name: str | None
    scope: str
    prefix: str
    created_at: str
    limits: KeyLimits = NO_LIMITS

    def to_dict(self) -> dict:
        """JSON form for the admin API."""
        return {
            "id": self.id,
            "name": self.name,
            "scope": self.scope,
            "prefix": self.prefix,
            "created_at": self.created_at,
            **self.limits.to_dict(),
        }


def _row_to_info(row: Any) -> KeyInfo:
    return KeyInfo(
        row["id"],
        row["name"],
        row["scope"],
        row["prefix"],
        row["created_at"],
        KeyLimits.from_json(row["limits"]),
    )


def create_key(
    conn: db.Conn, scope: str, name: str | None = None, limits: KeyLimits = NO_LIMITS
) -> tuple[KeyInfo, str]:
    """Store a new key of ``scope`` with ``limits``; returns its info and the key itself
    (shown once).

    Raises:
        ValueError: unknown scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    key = generate_key()
    info = KeyInfo(
        "key_" + secrets.token_hex(8), name, scope, _display_prefix(key), db.now_iso(), limits
    )
    with db.transaction(conn):
        _insert(conn, info, hash_key(key))
    return info, key


def _insert(conn: db.Conn, info: KeyInfo, key_hash: str) -> None:
    conn.execute(
        "INSERT INTO api_keys (id, name, scope, key_hash, prefix, created_at, limits) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            info.id,
            info.name,
            info.scope,
            key_hash,
            info.prefix,
            info.created_at,
            info.limits.to_json(),
        ),
    )
    db.bump(conn, db.KEYS)


_UNSET: Any = object()


def _refuse_env_admin_key(key_id: str) -> None:
    """Refuse to change or revoke the ``LLMLB_ADMIN_KEY`` key (it is set again at every start).

    Raises:
        ApiError: 409 ``key_protected`` when ``key_id`` is that key.
    """
    if key_id == ENV_ADMIN_KEY_ID:
        raise ApiError(409, "key_protected", "this admin key is set by LLMLB_ADMIN_KEY")


def update_key(
    conn: db.Conn, key_id: str, changes: dict[str, Any], name: Any = _UNSET
) -> KeyInfo | None:
    """Change a key's limits (``changes``: limit fields, ``None`` removes one) and, when
    given, its ``name``, in one transaction; ``None`` when no such key.

    Raises:
        ApiError: 400 from :func:`~llmlb.router.control.limits.parse_limits` (nothing is
            written then); 409 ``key_protected`` for the ``LLMLB_ADMIN_KEY`` key.
    """
    with db.transaction(conn):
        row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            return None
        _refuse_env_admin_key(key_id)
        info = _row_to_info(row)
        limits = parse_limits(changes, info.limits)
        new_name = info.name if name is _UNSET else name
        conn.execute(
            "UPDATE api_keys SET name = ?, limits = ? WHERE id = ?",
            (new_name, limits.to_json(), key_id),
        )
        db.bump(conn, db.KEYS)
    return KeyInfo(info.id, new_name, info.scope, info.prefix, info.created_at, limits)


def read_key_body(
    body: dict[str, Any], creating: bool
) -> tuple[str | None, Any, dict[str, Any]]:
    """Split an admin key body into scope, name and limit fields, validating scope and name
    (limit fields are validated by :func:`~llmlb.router.control.limits.parse_limits`).

    Returns:
        ``(scope, name, limit_fields)``; ``name`` is ``_UNSET`` when absent from a change.

    Raises:
        ApiError: 400 naming the field.
    """
    fields = dict(body)
    scope = fields.pop("scope", None)
    if creating:
        if scope not in SCOPES:
            raise ApiError(
                400, "invalid_request_error", "scope must be one of api, node, admin",
                param="scope",
            )
    elif scope is not None:
        raise ApiError(400, "invalid_request_error", "a key's scope cannot change", param="scope")
    name = fields.pop("name", None if creating else _UNSET)
    if name is not None and name is not _UNSET and (not isinstance(name, str) or len(name) > 200):
        raise ApiError(
            400, "invalid_request_error", "name must be a string (<= 200 chars)", param="name"
        )
    return scope, name, fields


def get_key(conn: db.Conn, key_id: str) -> KeyInfo | None:
    """One stored key by id."""
    row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    return None if row is None else _row_to_info(row)


def list_keys(conn: db.Conn) -> list[KeyInfo]:
    """Every stored key, oldest first."""
    rows = conn.execute("SELECT * FROM api_keys ORDER BY created_at, id").fetchall()
    return [_row_to_info(row) for row in rows]


def delete_key(conn: db.Conn, key_id: str) -> bool:
    """Revoke (delete) a key; ``False`` when no such key.

    Raises:
        ApiError: 409 ``key_protected`` for the ``LLMLB_ADMIN_KEY`` key (it comes back at every
            start) and for the last admin key (nobody could manage the router any more).
    """
    with db.transaction(conn):
        row = conn.execute("SELECT scope FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            return False
        _refuse_env_admin_key(key_id)
        if row[0] == "admin":
            admins = conn.execute("SELECT COUNT(*) FROM api_keys WHERE scope = 'admin'").fetchone()
            if admins[0] <= 1:
                raise ApiError(409, "key_protected", "cannot revoke the last admin key")
        conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))
        db.bump(conn, db.KEYS)
    return True


def load_hashes(conn: db.Conn) -> dict[str, str]:
    """``{key_hash: scope}`` of every key."""
    return {row[0]: row[1] for row in conn.execute("SELECT key_hash, scope FROM api_keys")}


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """What the auth cache holds of a key: its id, scope and limits (``limits`` ``None``:
    none enforced; ``expires`` the unix time it stops working, if any)."""

    id: str
    scope: str
    limits: KeyLimits | None = None
    expires: float | None = None


def load_entries(conn: db.Conn) -> dict[str, KeyEntry]:
    """``{key_hash: KeyEntry}`` of every key, for the auth cache."""
    out: dict[str, KeyEntry] = {}
    for row in conn.execute("SELECT key_hash, id, scope, limits FROM api_keys"):
        limits = KeyLimits.from_json(row[3])
        out[row[0]] = KeyEntry(
            row[1], row[2], None if limits.empty else limits, limits.expires_ts
        )
    return out


def bootstrap_admin_key(conn: db.Conn, home: Path, fixed_key: str | None) -> Path | None:
    """Make sure an admin key exists.

    With ``fixed_key`` (``LLMLB_ADMIN_KEY``) that key becomes the admin key. Otherwise, if no
    admin key is stored, one is generated and written to ``home/admin.key`` (mode 0600); its
    path (never the key) is logged.

    Returns:
        The path of a newly written key file, else ``None``.
    """
    with db.transaction(conn):
        if fixed_key:
            digest = hash_key(fixed_key)
            row = conn.execute("SELECT id FROM api_keys WHERE key_hash = ?", (digest,)).fetchone()
            if row is None or row[0] != ENV_ADMIN_KEY_ID:
                conn.execute("DELETE FROM api_keys WHERE id = ?", (ENV_ADMIN_KEY_ID,))
                if row is not None:  # the same key stored under another id: keep one row
                    conn.execute("DELETE FROM api_keys WHERE id = ?", (row[0],))
                info = KeyInfo(
                    ENV_ADMIN_KEY_ID,
                    "LLMLB_ADMIN_KEY",
                    "admin",
                    _display_prefix(fixed_key),
                    db.now_iso(),
                )
                _insert(conn, info, digest)
            return None
        if conn.execute("SELECT 1 FROM api_keys WHERE scope = 'admin' LIMIT 1").fetchone():
            return None
        key = generate_key()
        path = home / ADMIN_KEY_FILE
        write_private_file(path, key + "\n")
        info = KeyInfo(
            "key_" + secrets.token_hex(8), "admin", "admin", _display_prefix(key), db.now_iso()
        )
        _insert(conn, info, hash_key(key))
    logger.warning("generated an admin key; it is in %s (mode 0600)", path)
    return path


class KeyCache:
    """Every key's hash and scope, in memory; the only thing auth ever reads.

    Lookup is by the first 16 hex digits of the presented key's sha256; the full digest is
    then compared with :func:`hmac.compare_digest`.
    """

    __slots__ = ("_index", "clock")

    def __init__(self, clock: Any = time.time) -> None:
        self._index: dict[str, tuple[str, KeyEntry]] = {}
        self.clock = clock

    def replace(self, scopes: dict[str, str]) -> None:
        """Swap in a fresh ``{hash: scope}`` map (keys without limits)."""
        self.load({digest: KeyEntry("", scope) for digest, scope in scopes.items()})

    def load(self, entries: dict[str, KeyEntry]) -> None:
        """Swap in a fresh ``{hash: KeyEntry}`` map (:func:`load_entries`)."""
        self._index = {digest[:16]: (digest, entry) for digest, entry in entries.items()}

    def entry_of(self, key: bytes | str | None) -> KeyEntry | None:
        """The entry of a presented key, or ``None`` if it is unknown or expired."""
        if key is None:
            return None
        digest = hash_key(key)
        found = self._index.get(digest[:16])
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        entry = found[1]
        if entry.expires is not None and self.clock() >= entry.expires:
            return None
        return entry

    def lookup(
        self, authorization: bytes | str | None, x_api_key: bytes | str | None = None
    ) -> KeyEntry | None:
        """The entry of a request's key (bearer, else ``x-api-key``); ``None``: 401."""
        return self.entry_of(api_key(authorization, x_api_key))

    def scope_of(self, key: bytes | str) -> str | None:
        """Scope of a presented key, or ``None`` if it is unknown (or expired)."""
        entry = self.entry_of(key)
        return None if entry is None else entry.scope

    def check(
        self,
        authorization: bytes | str | None,
        required: str | None,
        x_api_key: bytes | str | None = None,
    ) -> int | None:
        """Authorise a request's key against ``required`` scope.

        Args:
            authorization: the ``Authorization`` header value (``Bearer <key>``), or ``None``.
            required: ``api``, ``node``, ``admin``, or ``None`` for any valid key.
            x_api_key: the ``x-api-key`` header value (Anthropic's clients), used when
                ``Authorization`` carries no bearer key.

        Returns:
            ``None`` when allowed, else :data:`UNAUTHENTICATED` (401) or :data:`FORBIDDEN` (403).
        """
        entry = self.lookup(authorization, x_api_key)
        if entry is None:
            return UNAUTHENTICATED
        return permits(entry, required)


def permits(entry: KeyEntry, required: str | None) -> int | None:
    """``None`` when ``entry``'s scope allows ``required`` (``admin`` allows all), else
    :data:`FORBIDDEN`."""
    scope = entry.scope
    if required is None or scope == required or scope == "admin":
        return None
    return FORBIDDEN
