"""llmlb.errors: one constructor per shared error code, one message, one class per name."""

from __future__ import annotations

import ast
import pathlib

import llmlb
import orjson
from llmlb import errors
from llmlb.model_storage import InvalidModelId, normalize_model_id


def _error(exc: errors.ApiError) -> dict[str, str]:
    return orjson.loads(exc.body())["error"]


def test_shared_codes_have_one_message() -> None:
    assert _error(errors.model_not_found("org/m")) == {
        "message": "model 'org/m' not found",
        "type": "not_found_error",
        "code": "model_not_found",
    }
    assert errors.model_not_found("org/m").status == 404
    exists = errors.model_already_registered("org/m")
    assert (exists.status, exists.code) == (409, "model_exists")
    assert exists.message == "model org/m is already registered"
    missing = errors.key_not_found(7)
    assert (missing.status, missing.code, missing.message) == (
        404,
        "key_not_found",
        "no key with id 7",
    )
    unauthorized = errors.invalid_api_key("sync token")
    assert (unauthorized.status, unauthorized.code) == (401, "invalid_api_key")
    assert unauthorized.message == "missing or invalid sync token"
    assert _error(unauthorized)["type"] == "authentication_error"
    big = errors.request_too_large(1024)
    assert (big.status, big.code, big.message) == (
        413,
        "request_too_large",
        "request body exceeds 1024 bytes",
    )


def test_invalid_model_id_carries_the_rule_and_the_field() -> None:
    try:
        normalize_model_id("a//b")
    except InvalidModelId as exc:
        error = errors.invalid_model_id(exc, "model")
    assert error.status == 400
    assert _error(error)["code"] == "invalid_model_id"
    assert _error(error)["param"] == "model"
    assert _error(error)["message"] == error.message and error.message


def test_ambiguous_artifacts_lists_the_choices() -> None:
    error = _error(errors.AmbiguousArtifactsError("two models", ["a.gguf", "b.gguf"]))
    assert error["code"] == "ambiguous_artifacts"
    assert error["choices"] == ["a.gguf", "b.gguf"]  # type: ignore[comparison-overlap]
    assert error["message"] == "two models (choose a filename: a.gguf, b.gguf)"


def test_no_two_error_classes_share_a_name() -> None:
    seen: dict[str, str] = {}
    root = pathlib.Path(llmlb.__file__).parent
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
            if not any(b.endswith(("Error", "Exception")) for b in bases) and not (
                node.name.endswith("Error")
            ):
                continue
            where = str(path.relative_to(root))
            assert node.name not in seen, f"{node.name} in {seen.get(node.name)} and {where}"
            seen[node.name] = where


def test_every_public_error_is_documented() -> None:
    for name in dir(errors):
        value = getattr(errors, name)
        if name.startswith("_") or getattr(value, "__module__", None) != errors.__name__:
            continue
        assert (value.__doc__ or "").strip(), name
