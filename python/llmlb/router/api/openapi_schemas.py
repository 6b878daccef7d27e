"""The components of the router's OpenAPI document: the JSON Schemas of its bodies and
answers (the node-router protocol's own from :mod:`llmlb.protocol`).

Apart from :mod:`.openapi_paths` (the operations that refer to them by name).
"""

from __future__ import annotations

from typing import Any

from llmlb import protocol
from llmlb.prefix_keys import MAX_REPORT_KEYS
from llmlb.router.proxy.prefix_index import MAX_REPORT_BYTES


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "string"}},
                },
            }
        },
    },
    # Key and KeyCreate (with the key's limits): openapi_tenancy.SCHEMAS
    "NewKey": {
        "allOf": [
            _ref("Key"),
            {"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}},
        ]
    },
    "RegisterModel": {
        "type": "object",
        "required": ["repo"],
        "properties": {
            "repo": {"type": "string", "minLength": 1, "description": "`Org/Name` or a hub URL"},
            "filename": {"type": ["string", "null"]},
            "revision": {"type": ["string", "null"], "default": "main"},
            "id": {"type": ["string", "null"], "description": "default: the repo, lowercased"},
            "chat_template": {"type": ["string", "null"]},
        },
        "examples": [{"repo": "unsloth/gemma-3-270m-it-GGUF"}],
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by", "ready", "nodes_ready"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "ready": {"type": "boolean"},
            "nodes_ready": {"type": "integer"},
            "format": {"type": ["string", "null"]},
            "size_bytes": {"type": ["integer", "null"]},
            "repo": {"type": ["string", "null"]},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "NodeModel": {
        "type": "object",
        "required": ["id", "repo", "revision", "format", "filename", "size_bytes", "updated_at"],
        "properties": {
            "id": {"type": "string"},
            "repo": {"type": "string"},
            "revision": {"type": "string"},
            "format": {"type": "string"},
            "filename": {"type": "string"},
            "size_bytes": {"type": "integer"},
            "quantization": {"type": ["string", "null"]},
            "updated_at": {"type": "string"},
        },
    },
    **protocol.SCHEMAS,
    "Node": {
        "type": "object",
        "required": ["node_id", "url", "status", "slots", "models"],
        "properties": {
            "node_id": {"type": "string"},
            "url": {"type": "string"},
            "status": {"enum": ["online", "offline"]},
            "runtimes": {"type": "array", "items": {"type": "string"}},
            "gpu": {"type": "object"},
            "slots": {"type": "integer"},
            "active_requests": {"type": "integer"},
            "models": {"type": "array", "items": {"type": "object"}},
            "registered_at": {"type": "string"},
            "last_seen": {"type": "string"},
            "approval": {"enum": ["approved", "pending"]},
            "approved_at": {"type": ["string", "null"]},
        },
    },
    "CacheReport": {
        "type": "object",
        "description": "What a node's prompt caches gained and lost, as prefix keys per model "
        "(llmlb.prefix_keys). Reports are numbered seq = 1, 2, ... within the node process's "
        "epoch; a snapshot lists every key held and replaces what the router knew (then the "
        "next delta is seq + 1); removed keys apply before stored ones. At most "
        f"{MAX_REPORT_KEYS} keys and {MAX_REPORT_BYTES} bytes per report; model ids follow "
        "the model id rules; a snapshot removes nothing.",
        "required": ["epoch", "seq"],
        "properties": {
            "epoch": {"type": "string", "minLength": 8, "maxLength": 64},
            "seq": {"type": "integer", "minimum": 1, "maximum": 1 << 62},
            "snapshot": {"type": "boolean", "default": False},
            "stored": {
                "type": "object",
                "additionalProperties": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF},
                },
            },
            "removed": {
                "type": "object",
                "additionalProperties": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF},
                },
            },
            "node_secret": {
                "type": "string",
                "description": "the node's secret, as in heartbeats (else the bearer key "
                "proves the node)",
            },
        },
    },
    "CacheReportAck": {
        "type": "object",
        "required": ["node_id", "epoch", "seq", "keys"],
        "properties": {
            "node_id": {"type": "string"},
            "epoch": {"type": "string"},
            "seq": {"type": "integer"},
            "keys": {
                "type": "integer",
                "description": "keys this router worker now holds for the node",
            },
        },
    },
    "NodeApproval": {
        "type": "object",
        "required": ["node_id", "approval"],
        "properties": {
            "node_id": {"type": "string"},
            "approval": {"enum": ["approved", "pending"]},
        },
    },
    "TrafficSeries": {
        "type": "object",
        "description": "Per interval (aligned with Traffic.t): answers, errors, TTFB quantiles.",
        "required": ["requests", "errors", "ttfb_p50_s", "ttfb_p95_s"],
        "properties": {
            "requests": {"type": "array", "items": {"type": "integer"}},
            "errors": {"type": "array", "items": {"type": "integer"}},
            "rejected": {"type": "array", "items": {"type": "integer"}},
            "ttfb_p50_s": {"type": "array", "items": {"type": ["number", "null"]}},
            "ttfb_p95_s": {"type": "array", "items": {"type": ["number", "null"]}},
        },
    },
    "Traffic": {
        "type": "object",
        "required": ["interval_s", "window_s", "t", "total", "models", "nodes", "balancer"],
        "properties": {
            "interval_s": {"type": "number"},
            "window_s": {"type": "number"},
            "t": {"type": "array", "items": {"type": "number"}, "description": "interval ends"},
            "total": _ref("TrafficSeries"),
            "models": {"type": "object", "additionalProperties": _ref("TrafficSeries")},
            "nodes": {"type": "object", "additionalProperties": _ref("TrafficSeries")},
            "balancer": {
                "type": "object",
                "description": "The answering worker's view of each node.",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "cooled_down": {"type": "boolean"},
                        "outstanding": {"type": "integer"},
                    },
                },
            },
            "worker": {"type": "integer", "description": "the answering worker's process id"},
            "routing": {
                "type": "object",
                "description": "Prefix-aware routing over the window: models[id][reason] "
                "counts the nodes chosen by reason (prefix, load, affinity, fallback); "
                "nodes[id][model] the prompt characters the node answered and how many of "
                "them the index predicted its cache held; index[id] the keys the answering "
                "worker's index holds for the node (epoch and seq of its last report).",
                "properties": {
                    "models": {"type": "object"},
                    "nodes": {"type": "object"},
                    "index": {"type": "object"},
                },
            },
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["model"],
        "properties": {"model": {"type": "string", "minLength": 1}},
        "description": "An OpenAI or Anthropic request; forwarded to a node unchanged.",
    },
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
        "description": "Errors of the Anthropic Messages routes, in Anthropic's shape.",
    },
}
