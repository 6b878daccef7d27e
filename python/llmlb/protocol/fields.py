"""The protocol's shared pieces: the bounds on counts and sizes, the model states a node
reports, the validators of ids, secrets and URLs, and the JSON Schema fragments.

Apart because every wire shape below (manifests, reports, registration, sync) uses them.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from llmlb.errors import ApiError, invalid_model_id
from llmlb.model_storage import InvalidModelId, normalize_model_id

MAX_COUNT = 1_000_000  # bound on slots, active requests and attempts
MAX_BYTES = 1 << 60  # bound on sizes, progress and times


class ModelState(StrEnum):
    """The state a node reports for one model."""

    READY = "ready"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    FAILED = "failed"


#: Every state, in the order the CLI ranks a model across nodes (ready first).
MODEL_STATES: tuple[str, ...] = tuple(state.value for state in ModelState)
_READY = ModelState.READY.value
#: States of a model a node is still getting ready.
PENDING_STATES = frozenset({ModelState.DOWNLOADING, ModelState.LOADING})

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_NODE_SECRET = re.compile(r"[\x21-\x7e]{16,256}")

_STATE_ENUM = {"enum": list(MODEL_STATES)}
_BYTES = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_BYTES}
_STRINGS = {"type": "array", "items": {"type": "string"}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _node_secret_schema(role: str) -> dict[str, Any]:
    """The schema of a body's ``node_secret``; ``role`` ends its description (what the secret
    does in that body)."""
    return {
        "type": ["string", "null"],
        "description": f"The node's own secret (16-256 printable ASCII){role}",
    }


# --- validation of bodies from the other side ------------------------------------------


def _bad(message: str, code: str = "invalid_request_error") -> ApiError:
    return ApiError(400, code, message)


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


def _optional_bool(value: Any, name: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise _bad(f"{name} must be a boolean")
    return value


def _model_id(value: Any, message: str) -> str:
    """A model id from a body, normalised.

    Raises:
        ApiError: 400 ``message`` when ``value`` is not a string, ``invalid_model_id`` when it
            breaks the id rules.
    """
    if not isinstance(value, str):
        raise _bad(message)
    try:
        return normalize_model_id(value)
    except InvalidModelId as exc:
        raise invalid_model_id(exc) from None


def validate_node_id(value: Any) -> str:
    """A node id: 1-128 characters of ``[A-Za-z0-9._:-]``, starting alphanumeric.

    Raises:
        ApiError: 400 ``invalid_node_id``.
    """
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


def _runtimes(value: Any) -> list[str]:
    """A ``runtimes`` list (e.g. ``["llama.cpp"]``)."""
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise _bad("runtimes must be a list of strings")
    return value
