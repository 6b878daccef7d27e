"""Model registry: request parsing, hub error mapping, one-transaction storage."""

from __future__ import annotations

import orjson
import pytest
from llmlb.errors import (
    AmbiguousArtifacts,
    ApiError,
    HubRepoNotFound,
    HubUnavailable,
    NoSupportedArtifacts,
)
from llmlb.hub.repo import RepoManifest
from llmlb.model_storage import InvalidModelId
from llmlb.protocol import ManifestFile
from llmlb.router import db
from llmlb.router.control import registry

SHA = "a" * 40


def _manifest(*names: str) -> RepoManifest:
    files = [
        ManifestFile(
            filename=name,
            format="gguf",
            size_bytes=100,
            sha256="f" * 64,
            url=f"http://hub/Org/Name/resolve/{SHA}/{name}",
            priority=i,
            backends=["metal"] if name.endswith(".metal.bin") else [],
        )
        for i, name in enumerate(names)
    ]
    return RepoManifest("Org/Name", SHA, "gguf", names[0], "Q4_K_M", None, files, 100 * len(names))


@pytest.fixture
def conn(db_target):
    """A migrated connection, on SQLite and on PostgreSQL in turn."""
    connection = db.open_database(db_target)
    yield connection
    connection.close()


def test_request_defaults_and_validation():
    req = registry.RegisterRequest.parse({"repo": "Org/Name-GGUF"})
    assert (req.model_id, req.revision, req.filename) == ("org/name-gguf", "main", None)
    url = registry.RegisterRequest.parse({"repo": "https://huggingface.co/Org/X/blob/main/a.gguf"})
    assert url.model_id == "org/x"
    assert (
        registry.RegisterRequest.parse({"repo": "a/b", "id": "Team/M:Q8_0"}).model_id
        == "team/m:q8_0"
    )
    for body, code in [
        ({}, "invalid_request_error"),
        ({"repo": "a/b", "filename": 1}, "invalid_request_error"),
        ({"repo": "nope"}, "invalid_model_id"),
        ({"repo": "a/b", "id": "a/../b"}, "invalid_model_id"),
    ]:
        with pytest.raises(ApiError) as err:
            registry.RegisterRequest.parse(body)
        assert (err.value.status, err.value.code) == (400, code)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (InvalidModelId("bad"), 400, "invalid_model_id"),
        (AmbiguousArtifacts("several", ["a.gguf", "b.gguf"]), 400, "ambiguous_artifacts"),
        (NoSupportedArtifacts("none"), 400, "no_supported_artifacts"),
        (HubRepoNotFound("missing"), 404, "hub_repo_not_found"),
        (HubUnavailable("down"), 502, "upstream_error"),
        (RuntimeError("surprise"), 502, "upstream_error"),
    ],
)
def test_hub_errors_map_to_http(exc, status, code):
    error = registry.hub_error_to_api(exc)
    assert (error.status, error.code) == (status, code)
    if code == "ambiguous_artifacts":
        assert orjson.loads(error.body())["error"]["choices"] == ["a.gguf", "b.gguf"]


def test_store_and_read_back(conn):
    row = registry.store_model(conn, "org/name", _manifest("m.gguf", "m.metal.bin"), "{{ t }}")
    assert row["revision"] == SHA and row["size_bytes"] == 200 and row["quantization"] == "Q4_K_M"
    doc = registry.get_manifest(conn, "org/name")
    assert doc["chat_template"] == "{{ t }}" and doc["total_size_bytes"] == 200
    assert [f["filename"] for f in doc["files"]] == ["m.gguf", "m.metal.bin"]
    assert doc["files"][1]["backends"] == ["metal"] and doc["files"][0]["optional"] is False
    assert [m.id for m in registry.load_registered(conn)] == ["org/name"]
    with pytest.raises(ApiError) as err:
        registry.store_model(conn, "org/name", _manifest("m.gguf"), None)
    assert (err.value.status, err.value.code) == (409, "model_exists")
    assert registry.delete_model(conn, "org/name") is True
    assert registry.get_manifest(conn, "org/name") is None
    assert conn.execute("SELECT COUNT(*) FROM model_files").fetchone()[0] == 0  # cascaded
    assert registry.delete_model(conn, "org/name") is False


def test_a_failed_store_leaves_nothing(conn):
    before = db.versions(conn)
    with pytest.raises(db.INTEGRITY_ERRORS):  # the same file twice breaks the file table
        registry.store_model(conn, "org/name", _manifest("m.gguf", "m.gguf"), None)
    assert registry.list_models(conn) == []
    assert conn.execute("SELECT COUNT(*) FROM model_files").fetchone()[0] == 0
    assert db.versions(conn) == before


def test_ids_that_nest_conflict(conn):
    registry.store_model(conn, "org/nest", _manifest("m.gguf"), None)
    registry.store_model(conn, "solo:q4_k_m", _manifest("m.gguf"), None)
    for model_id, other in [
        ("org/nest/inner", "org/nest"),
        ("org/nest/a/b:q8_0", "org/nest"),
        ("org", "org/nest"),
        ("solo/x", "solo:q4_k_m"),
    ]:
        assert registry.conflicting_model(conn, model_id) == other
        with pytest.raises(ApiError) as info:
            registry.store_model(conn, model_id, _manifest("m.gguf"), None)
        assert (info.value.status, info.value.code) == (409, "model_id_conflict")
        assert other in str(info.value)
    # Siblings, look-alike prefixes and another quantisation of the same directory are fine.
    for model_id in ("org/nest-2", "org/nes", "org/other/nest", "solo:q8_0", "org_nest/inner"):
        assert registry.conflicting_model(conn, model_id) is None, model_id
        registry.store_model(conn, model_id, _manifest("m.gguf"), None)
    assert not registry.model_exists(conn, "org/nest/inner")
