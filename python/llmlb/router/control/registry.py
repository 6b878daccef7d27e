"""Model registry: registration requests, the hub lookup, and models + manifests in the
database."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from llmlb.errors import (
    AmbiguousArtifacts,
    AmbiguousArtifactsError,
    ApiError,
    HubRepoNotFound,
    HubUnavailable,
    NoSupportedArtifacts,
    invalid_model_id,
    model_already_registered,
)
from llmlb.http import model_id_or_400
from llmlb.model_storage import InvalidModelId, split_quant
from llmlb.protocol import Manifest, ManifestFile
from llmlb.router import db
from llmlb.router.control.fleet import RegisteredModel
from llmlb.router.control.settings import RouterSettings


def _repo_id(repo: str) -> str:
    """``Org/Name`` of a repo given as such or as a hub URL.

    Raises:
        ApiError: 400 ``invalid_model_id`` for a malformed repo or URL.
    """
    from llmlb.hub.repo import parse_repo_ref

    try:
        return parse_repo_ref(repo)[0]
    except InvalidModelId as exc:
        raise invalid_model_id(exc) from None


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """A validated ``POST /v1/models/register`` body."""

    repo: str
    model_id: str
    revision: str
    filename: str | None
    chat_template: str | None

    @classmethod
    def parse(cls, body: dict) -> RegisterRequest:
        """Validate the body and settle the model id (default: the repo name, lowercased).

        Raises:
            ApiError: 400 ``invalid_request_error`` / ``invalid_model_id``.
        """
        repo = body.get("repo")
        if not isinstance(repo, str) or not repo.strip():
            raise ApiError(400, "invalid_request_error", "repo is required (a string)")
        for name in ("filename", "revision", "id", "chat_template"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise ApiError(400, "invalid_request_error", f"{name} must be a string")
        revision = body.get("revision") or "main"
        raw_id = body.get("id") or _repo_id(repo).lower()
        return cls(
            repo=repo.strip(),
            model_id=model_id_or_400(raw_id),
            revision=revision,
            filename=body.get("filename") or None,
            chat_template=body.get("chat_template"),
        )


def hub_error_to_api(exc: Exception) -> ApiError:
    """Map a hub failure to the HTTP error the admin sees."""
    if isinstance(exc, InvalidModelId):
        return invalid_model_id(exc)
    if isinstance(exc, AmbiguousArtifacts):
        return AmbiguousArtifactsError(str(exc), list(exc.choices))
    if isinstance(exc, NoSupportedArtifacts):
        return ApiError(400, "no_supported_artifacts", str(exc))
    if isinstance(exc, HubRepoNotFound):
        return ApiError(404, "hub_repo_not_found", str(exc))
    if isinstance(exc, HubUnavailable):
        return ApiError(502, "upstream_error", f"hub unavailable: {exc}")
    return ApiError(502, "upstream_error", f"hub lookup failed: {type(exc).__name__}: {exc}")


async def fetch_manifest(settings: RouterSettings, req: RegisterRequest) -> Any:
    """Ask the hub for the repo's artifacts (in a thread); returns a ``RepoManifest``.

    Raises:
        ApiError: the mapped hub failure.
    """
    from llmlb.hub.repo import fetch_repo_manifest

    try:
        return await asyncio.to_thread(
            fetch_repo_manifest,
            req.repo,
            revision=req.revision,
            filename=req.filename,
            endpoint=settings.hf_endpoint,
            token=settings.hf_token,
        )
    except Exception as exc:  # every hub failure becomes an HTTP error
        raise hub_error_to_api(exc) from exc


def model_exists(conn: db.Conn, model_id: str) -> bool:
    """Whether ``model_id`` is registered."""
    return conn.execute("SELECT 1 FROM models WHERE id = ?", (model_id,)).fetchone() is not None


def conflicting_model(conn: db.Conn, model_id: str) -> str | None:
    """A registered model whose store directory would contain ``model_id``'s or lie inside it.

    Ids are compared by their base (``:QUANT`` dropped): ``nest`` and ``nest/inner:q4``
    conflict, ``m:q4`` and ``m:q8`` (two files in one directory) do not.
    """
    base = split_quant(model_id)[0]
    outer = [base[:i] for i, c in enumerate(base) if c == "/"]
    clauses = ["substr(id, 1, ?) = ?"]  # models inside: "<base>/..."
    params: list[object] = [len(base) + 1, base + "/"]
    for prefix in outer:  # models around: "<prefix>" or "<prefix>:quant"
        clauses.append("id = ? OR substr(id, 1, ?) = ?")
        params += [prefix, len(prefix) + 1, prefix + ":"]
    row = conn.execute(
        f"SELECT id FROM models WHERE {' OR '.join(clauses)} ORDER BY id LIMIT 1", params
    ).fetchone()
    return row[0] if row else None


def check_no_conflict(conn: db.Conn, model_id: str) -> None:
    """Refuse an id that is a path prefix of a registered model's id, or has one as a prefix.

    Raises:
        ApiError: 409 ``model_id_conflict`` naming the other model.
    """
    other = conflicting_model(conn, model_id)
    if other is not None:
        raise ApiError(
            409,
            "model_id_conflict",
            f"model {model_id} conflicts with registered model {other}: one id may not be a "
            "path prefix of another (their store directories would nest)",
        )


def store_model(
    conn: db.Conn, model_id: str, manifest: Any, chat_template: str | None
) -> dict:
    """Store a model and its manifest in one transaction; returns the model's ``/v0`` row.

    Raises:
        ApiError: 409 ``model_exists`` or ``model_id_conflict``.
    """
    now = db.now_iso()
    template = chat_template if chat_template is not None else manifest.chat_template
    try:
        with db.transaction(conn):
            check_no_conflict(conn, model_id)
            conn.execute(
                "INSERT INTO models (id, repo, revision, format, filename, quantization, "
                "chat_template, size_bytes, created_at, created_ts, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    model_id,
                    manifest.repo,
                    manifest.revision,
                    manifest.format,
                    manifest.filename,
                    manifest.quantization,
                    template,
                    manifest.total_size_bytes,
                    now,
                    int(time.time()),
                    now,
                ),
            )
            conn.executemany(
                "INSERT INTO model_files (model_id, filename, format, size_bytes, sha256, url, "
                "priority, optional, backends) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        model_id,
                        f.filename,
                        f.format,
                        f.size_bytes,
                        f.sha256,
                        f.url,
                        f.priority,
                        int(bool(f.optional)),
                        orjson.dumps(list(f.backends)).decode(),
                    )
                    for f in manifest.files
                ],
            )
            db.bump(conn, db.FLEET)
    except db.INTEGRITY_ERRORS:
        if model_exists(conn, model_id):
            raise model_already_registered(model_id) from None
        raise
    return get_model_row(conn, model_id)  # type: ignore[return-value]


def delete_model(conn: db.Conn, model_id: str) -> bool:
    """Delete a model and its manifest; ``False`` when not registered."""
    with db.transaction(conn):
        deleted = conn.execute("DELETE FROM models WHERE id = ?", (model_id,)).rowcount
        if deleted:
            db.bump(conn, db.FLEET)
    return bool(deleted)


def _v0_row(row: Any) -> dict:
    return {
        "id": row["id"],
        "repo": row["repo"],
        "revision": row["revision"],
        "format": row["format"],
        "filename": row["filename"],
        "size_bytes": row["size_bytes"],
        "quantization": row["quantization"],
        "updated_at": row["updated_at"],
    }


def get_model_row(conn: db.Conn, model_id: str) -> dict | None:
    """One model in ``GET /v0/models`` form, or ``None``."""
    row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
    return _v0_row(row) if row else None


def list_models(conn: db.Conn) -> list[dict]:
    """Every registered model in ``GET /v0/models`` form."""
    return [_v0_row(row) for row in conn.execute("SELECT * FROM models ORDER BY id")]


def get_manifest(conn: db.Conn, model_id: str) -> dict | None:
    """The stored manifest of ``model_id`` in its wire form, or ``None``."""
    row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
    if row is None:
        return None
    files = tuple(
        ManifestFile.from_dict({**dict(f), "backends": orjson.loads(f["backends"])})
        for f in conn.execute(
            "SELECT * FROM model_files WHERE model_id = ? ORDER BY priority, filename",
            (model_id,),
        )
    )
    return Manifest(
        model_id=row["id"],
        files=files,
        repo=row["repo"],
        revision=row["revision"],
        format=row["format"],
        chat_template=row["chat_template"],
        quantization=row["quantization"],
        total_size_bytes=row["size_bytes"],
        created_at=row["created_at"],
    ).to_dict()


def load_registered(conn: db.Conn) -> list[RegisteredModel]:
    """Every registered model in the form the fleet cache holds."""
    return [
        RegisteredModel(row[0], row[1], row[2], row[3], row[4])
        for row in conn.execute("SELECT id, repo, format, size_bytes, created_ts FROM models")
    ]
