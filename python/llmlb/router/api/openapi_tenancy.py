"""The OpenAPI parts of tenancy: key limits, usage and the audit log.

:mod:`llmlb.router.api.openapi` merges :data:`SCHEMAS` into its components (replacing its
``Key`` and ``KeyCreate``) and :func:`paths` into its paths.
"""

from __future__ import annotations

from typing import Any

from llmlb.router.control.limits import MAX_MODELS, MAX_PARALLEL, MAX_RATE, PRIORITIES
from llmlb.router.control.usage import GROUPS


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    texts = {
        400: "Invalid request (error.param names the field)",
        401: "Missing, invalid or expired API key (invalid_api_key)",
        403: "Key scope insufficient (insufficient_scope)",
        404: "Not found",
        409: "The LLMLB_ADMIN_KEY key cannot change (key_protected)",
        413: "Request body too large",
    }
    return {str(s): _json(_ref("Error"), texts[s]) for s in statuses}


_MODEL_ENTRY = {
    "type": "string",
    "minLength": 1,
    "maxLength": 256,
    "pattern": r"^[a-z0-9_-][a-z0-9._-]*(/[a-z0-9_-][a-z0-9._-]*)*(/|\*)?$",
    "description": "a model id, or a prefix ending in `/` or `*`",
}


def _count_limit(maximum: int, description: str) -> dict[str, Any]:
    """A limit that is a count from 1 to ``maximum`` (null: no limit)."""
    return {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": maximum,
        "description": description,
    }


_LIMIT_PROPERTIES: dict[str, Any] = {
    "rpm": _count_limit(MAX_RATE, "requests per minute (a sliding minute)"),
    "tpm": _count_limit(MAX_RATE, "prompt + completion tokens per minute"),
    "max_parallel": _count_limit(MAX_PARALLEL, "requests in flight at once"),
    "budget_tokens": _count_limit(
        10**15, "tokens per budget_period (429 insufficient_quota beyond)"
    ),
    "budget_period": {"enum": ["day", "month", None], "description": "UTC day or month"},
    "models": {
        "type": ["array", "null"],
        "minItems": 1,
        "maxItems": MAX_MODELS,
        "items": _MODEL_ENTRY,
        "description": "allowlist (403 model_not_allowed outside it)",
    },
    "priority": {"enum": [*PRIORITIES, None], "description": "weight in fair queuing"},
    "expires_at": {
        "type": ["string", "null"],
        "format": "date-time",
        "description": "RFC 3339 time after which the key answers 401",
    },
}
_LIMIT_DEPENDENCIES = {"budget_tokens": ["budget_period"], "budget_period": ["budget_tokens"]}
_USAGE_ROW = {
    "type": "object",
    "required": [
        "requests",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "total_tokens",
        "errors",
    ],
    "properties": {
        "key": {"type": "string"},
        "model": {"type": "string"},
        "node": {"type": "string"},
        "minute": {"type": "string"},
        "hour": {"type": "string"},
        "day": {"type": "string"},
        "requests": {"type": "integer"},
        "prompt_tokens": {"type": "integer"},
        "cached_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "errors": {"type": "integer"},
    },
}

SCHEMAS: dict[str, Any] = {
    "Key": {
        "type": "object",
        "required": ["id", "scope", "prefix", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": ["string", "null"]},
            "scope": {"enum": ["api", "node", "admin"]},
            "prefix": {"type": "string"},
            "created_at": {"type": "string"},
            **_LIMIT_PROPERTIES,
        },
    },
    "KeyCreate": {
        "type": "object",
        "required": ["scope"],
        "additionalProperties": False,
        "dependentRequired": _LIMIT_DEPENDENCIES,
        "properties": {
            "scope": {"enum": ["api", "node", "admin"]},
            "name": {"type": ["string", "null"], "maxLength": 200},
            **_LIMIT_PROPERTIES,
        },
    },
    "KeyUpdate": {
        "type": "object",
        "additionalProperties": False,
        "description": "fields to change; null removes a limit",
        "properties": {
            "name": {"type": ["string", "null"], "maxLength": 200},
            **_LIMIT_PROPERTIES,
        },
    },
    "Usage": {
        "type": "object",
        "required": ["from", "to", "group_by", "usage"],
        "properties": {
            "from": {"type": "string"},
            "to": {"type": "string"},
            "group_by": {"type": "array", "items": {"enum": list(GROUPS)}},
            "usage": {"type": "array", "items": _USAGE_ROW},
            "key": {"type": "string"},
            "budget": {"type": "object"},
        },
    },
    "AuditEntry": {
        "type": "object",
        "required": ["seq", "at", "actor", "action", "target", "change", "prev_hash", "hash"],
        "properties": {
            "seq": {"type": "integer"},
            "at": {"type": "string"},
            "actor": {"type": "string", "description": "the acting key's id"},
            "action": {"type": "string"},
            "target": {"type": "string"},
            "change": {
                "description": "the request's JSON body (null when it had none); a field whose "
                "name holds a secret word (key, token, secret, password, authorization, "
                'credential, cookie) has the value "[redacted]"'
            },
            "prev_hash": {"type": "string"},
            "hash": {"type": "string"},
        },
    },
}

_USAGE_PARAMS = [
    {"name": "key", "in": "query", "schema": {"type": "string"}},
    {"name": "model", "in": "query", "schema": {"type": "string"}},
    {
        "name": "from",
        "in": "query",
        "schema": {"type": "string", "pattern": r"^[0-9]{1,12}$"},
        "description": "unix seconds or RFC 3339 (default: 24 hours before `to`)",
    },
    {
        "name": "to",
        "in": "query",
        "schema": {"type": "string", "pattern": r"^[0-9]{1,12}$"},
        "description": "unix seconds or RFC 3339 (default: now)",
    },
    {
        "name": "group_by",
        "in": "query",
        "schema": {"enum": ["key", "model", "node", "key,model", "model,hour", "key,day"]},
        "description": f"comma-separated of {', '.join(GROUPS)} (at most one time unit)",
    },
    {"name": "format", "in": "query", "schema": {"enum": ["json", "csv"]}},
]


def paths() -> dict[str, Any]:
    """The tenancy operations, by path (``/v0/keys/{key_id}`` gains ``patch``)."""
    usage_answer = {
        "description": "Usage (JSON, or CSV with format=csv)",
        "content": {"application/json": {"schema": _ref("Usage")}, "text/csv": {}},
    }
    return {
        "/v0/keys/{key_id}": {
            "patch": {
                "operationId": "updateKey",
                "summary": "Change a key's name or limits (admin)",
                "parameters": [
                    {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("KeyUpdate")}},
                },
                "responses": {
                    "200": _json(_ref("Key"), "The key as it now is"),
                    **_errors(400, 401, 403, 404, 409, 413),
                },
            }
        },
        "/v0/usage": {
            "get": {
                "operationId": "getUsage",
                "summary": "Requests and tokens per key, model, node, time (admin)",
                "parameters": _USAGE_PARAMS,
                "responses": {"200": usage_answer, **_errors(400, 401, 403)},
            }
        },
        "/v0/usage/self": {
            "get": {
                "operationId": "getOwnUsage",
                "summary": "The presenting key's own usage and budget (any key)",
                "parameters": _USAGE_PARAMS,
                "responses": {"200": usage_answer, **_errors(400, 401, 403)},
            }
        },
        "/v0/audit": {
            "get": {
                "operationId": "getAudit",
                "summary": "The audit log of admin actions, oldest first (admin)",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["entries", "count"],
                            "properties": {
                                "entries": {"type": "array", "items": _ref("AuditEntry")},
                                "count": {"type": "integer"},
                            },
                        },
                        "Entries",
                    ),
                    **_errors(400, 401, 403),
                },
            }
        },
    }


def merge_paths(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the tenancy operations added."""
    for path, operations in paths().items():
        base[path] = {**base.get(path, {}), **operations}
    return base
