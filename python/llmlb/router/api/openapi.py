"""The router's OpenAPI 3.1 document, written by hand next to the routes it describes."""

from __future__ import annotations

from functools import cache
from typing import Any

from llmlb import __version__, protocol
from llmlb.prefix_keys import MAX_REPORT_KEYS
from llmlb.router.api import openapi_tenancy
from llmlb.router.proxy.prefix_index import MAX_REPORT_BYTES


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _request(schema: str) -> dict:
    """A required JSON request body of the component ``schema``."""
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _errors(*statuses: int, schema: str = "Error") -> dict:
    texts = {
        400: "Invalid request",
        401: "Missing or invalid API key (invalid_api_key)",
        403: "Key scope insufficient (insufficient_scope)",
        404: "Not found",
        409: "Conflict",
        413: "Request body too large",
        429: "Too many requests",
        502: "Upstream (hub or node) failure",
        503: "Not available yet",
    }
    return {str(s): _json(_ref(schema), texts[s]) for s in statuses}


def _linked(response: dict, links: dict[str, tuple[str, str]]) -> dict:
    """Add OpenAPI links: ``{operationId: (path parameter, response body field)}``."""
    response["links"] = {
        op: {"operationId": op, "parameters": {param: f"$response.body#/{field}"}}
        for op, (param, field) in links.items()
    }
    return response


_AUTH = [401, 403]
_MODEL_ID_PARAM = {
    "name": "model_id",
    "in": "path",
    "required": True,
    "description": "Model id; hierarchical ids may use `/` or `%2F`.",
    "schema": {"type": "string"},
}
_NODE_ID_PARAM = {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}

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


def _inference(operation_id: str, summary: str, errors: str = "Error") -> dict:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["inference"],
            "requestBody": _request("InferenceRequest"),
            "responses": {
                "200": {
                    "description": "The node's answer, relayed unchanged (JSON or SSE)",
                    "content": {"application/json": {}, "text/event-stream": {}},
                },
                **_errors(400, *_AUTH, 404, 413, 429, 502, 503, schema=errors),
            },
        }
    }


def _paths() -> dict:
    return {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "Alive")},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document (any valid key)",
                "responses": {"200": _json({"type": "object"}, "OpenAPI"), **_errors(*_AUTH)},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (admin)",
                "responses": {
                    "200": {"description": "Prometheus text", "content": {"text/plain": {}}},
                    **_errors(*_AUTH),
                },
            }
        },
        "/v0/keys": {
            "post": {
                "operationId": "createKey",
                "summary": "Create a key (admin); the key is returned once",
                "requestBody": _request("KeyCreate"),
                "responses": {
                    "201": _linked(
                        _json(_ref("NewKey"), "Created"), {"revokeKey": ("key_id", "id")}
                    ),
                    **_errors(400, *_AUTH, 413),
                },
            },
            "get": {
                "operationId": "listKeys",
                "summary": "List keys (admin), never the keys themselves",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["keys"],
                            "properties": {"keys": {"type": "array", "items": _ref("Key")}},
                        },
                        "Keys",
                    ),
                    **_errors(*_AUTH),
                },
            },
        },
        "/v0/keys/{key_id}": {
            "delete": {
                "operationId": "revokeKey",
                "summary": "Revoke a key (admin)",
                "parameters": [
                    {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "204": {"description": "Revoked"},
                    **_errors(*_AUTH, 404, 409),
                },
            }
        },
        "/v1/models/register": {
            "post": {
                "operationId": "registerModel",
                "summary": "Register a hub model (admin)",
                "requestBody": _request("RegisterModel"),
                "responses": {
                    "201": _linked(
                        _json({"type": "object"}, "Registered"),
                        {
                            "getModel": ("model_id", "id"),
                            "getManifest": ("model_id", "id"),
                            "deleteModel": ("model_id", "id"),
                        },
                    ),
                    **_errors(400, *_AUTH, 404, 409, 413, 502),
                },
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "List models (api)",
                "responses": {"200": _json(_ref("ModelList"), "Models"), **_errors(*_AUTH)},
            }
        },
        "/v1/models/{model_id}": {
            "parameters": [_MODEL_ID_PARAM],
            "get": {
                "operationId": "getModel",
                "summary": "One model (api)",
                "responses": {"200": _json(_ref("Model"), "Model"), **_errors(400, *_AUTH, 404)},
            },
            "delete": {
                "operationId": "deleteModel",
                "summary": "Delete a model (admin)",
                "responses": {"204": {"description": "Deleted"}, **_errors(400, *_AUTH, 404)},
            },
        },
        "/v0/models": {
            "get": {
                "operationId": "nodeModels",
                "summary": "Registered models, for nodes (node)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["models"],
                            "properties": {"models": {"type": "array", "items": _ref("NodeModel")}},
                        },
                        "Models",
                    ),
                    **_errors(*_AUTH),
                },
            }
        },
        "/v0/models/registry/{model_id}/manifest.json": {
            "get": {
                "operationId": "getManifest",
                "summary": "A model's manifest (node); with node_id, the peers that serve it",
                "parameters": [
                    _MODEL_ID_PARAM,
                    {
                        "name": "node_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "the asking node: adds peers and peer_wait_s",
                    },
                ],
                "responses": {
                    "200": _json(_ref("Manifest"), "Manifest"),
                    **_errors(400, *_AUTH, 404),
                },
            }
        },
        "/v0/models/{model_id}/retry": {
            "post": {
                "operationId": "retryModel",
                "summary": "Nodes retry the model's failed download now (admin)",
                "parameters": [_MODEL_ID_PARAM],
                "responses": {
                    "202": _json(
                        {
                            "type": "object",
                            "required": ["model", "action", "nodes"],
                            "properties": {
                                "model": {"type": "string"},
                                "action": {"type": "string", "enum": ["retry"]},
                                "nodes": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "Retry requested",
                    ),
                    **_errors(400, *_AUTH, 404),
                },
            }
        },
        "/v0/peers/report": {
            "post": {
                "operationId": "reportPeer",
                "summary": "A peer served bytes that failed their check (node); weighed: an "
                "approved reporter's own list at once, every list on reports of 2 approved nodes",
                "requestBody": _request("PeerReport"),
                "responses": {
                    "202": _json(_ref("PeerReport"), "Recorded"),
                    **_errors(400, *_AUTH, 409, 413),
                },
            }
        },
        "/v0/nodes": {
            "post": {
                "operationId": "registerNode",
                "summary": "Register a node (node)",
                "requestBody": _request("NodeRegistration"),
                "responses": {
                    "201": _linked(
                        _json(_ref("NodeRegistered"), "Registered"),
                        {
                            "nodeHeartbeat": ("node_id", "node_id"),
                            "approveNode": ("node_id", "node_id"),
                            "unregisterNode": ("node_id", "node_id"),
                        },
                    ),
                    **_errors(400, *_AUTH, 409, 413),
                },
            },
            "get": {
                "operationId": "listNodes",
                "summary": "List nodes (admin)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["nodes"],
                            "properties": {"nodes": {"type": "array", "items": _ref("Node")}},
                        },
                        "Nodes",
                    ),
                    **_errors(*_AUTH),
                },
            },
        },
        "/v0/nodes/{node_id}/heartbeat": {
            "post": {
                "operationId": "nodeHeartbeat",
                "summary": "Heartbeat with per-model state (node)",
                "parameters": [_NODE_ID_PARAM],
                "requestBody": _request("Heartbeat"),
                "responses": {
                    "200": _json(_ref("HeartbeatAck"), "Recorded"),
                    **_errors(400, *_AUTH, 404, 409, 413),
                },
            }
        },
        "/v0/nodes/{node_id}/cache": {
            "post": {
                "operationId": "nodeCacheReport",
                "summary": "What the node's prompt caches gained and lost, for prefix-aware "
                "routing (node; approved nodes only, 403 node_pending otherwise; 409 "
                "node_id_conflict for another credential, 409 cache_resync when this router "
                "needs a snapshot). Nothing is stored in the database: every router keeps its "
                "own index from the reports every node sends it.",
                "parameters": [_NODE_ID_PARAM],
                "requestBody": _request("CacheReport"),
                "responses": {
                    "202": _json(_ref("CacheReportAck"), "Applied"),
                    **_errors(400, *_AUTH, 404, 409, 413),
                },
            }
        },
        "/v0/nodes/{node_id}/approve": {
            "post": {
                "operationId": "approveNode",
                "summary": "Approve a pending node: client traffic, peer lists, peer token "
                "(admin; idempotent)",
                "parameters": [_NODE_ID_PARAM],
                "responses": {
                    "200": _json(_ref("NodeApproval"), "Approved"),
                    **_errors(400, *_AUTH, 404),
                },
            }
        },
        "/v0/nodes/{node_id}/revoke": {
            "post": {
                "operationId": "revokeNode",
                "summary": "Make a node pending again (admin; idempotent)",
                "parameters": [_NODE_ID_PARAM],
                "responses": {
                    "200": _json(_ref("NodeApproval"), "Pending"),
                    **_errors(400, *_AUTH, 404),
                },
            }
        },
        "/v0/nodes/{node_id}": {
            "delete": {
                "operationId": "unregisterNode",
                "summary": "Unregister a node (admin; node: only one bound to its key)",
                "parameters": [_NODE_ID_PARAM],
                "responses": {
                    "204": {"description": "Unregistered"},
                    **_errors(400, *_AUTH, 404, 409),
                },
            }
        },
        "/v0/traffic": {
            "get": {
                "operationId": "getTraffic",
                "summary": "The last minutes of proxied traffic, for the dashboard (admin)",
                "responses": {"200": _json(_ref("Traffic"), "Traffic"), **_errors(*_AUTH)},
            }
        },
        "/v1/chat/completions": _inference(
            "createChatCompletion", "Chat completion, proxied to a node (api)"
        ),
        "/v1/completions": _inference("createCompletion", "Completion, proxied to a node (api)"),
        "/v1/embeddings": _inference("createEmbedding", "Embeddings, proxied to a node (api)"),
        "/v1/responses": _inference(
            "createResponse", "Responses API (stateless), proxied to a node (api)"
        ),
        "/v1/messages": _inference(
            "createMessage", "Anthropic Messages API, proxied to a node (api)", "AnthropicError"
        ),
        "/v1/messages/count_tokens": _inference(
            "countMessageTokens",
            "Anthropic Messages token count, proxied to a node (api)",
            "AnthropicError",
        ),
    }


@cache
def openapi_schema() -> dict:
    """The OpenAPI 3.1 document served at ``/openapi.json``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llmlb router",
            "version": __version__,
            "description": "OpenAI-compatible load balancer: model registry, node registry, "
            'keys, and the inference proxy. Errors are `{"error": {message, type, code}}`.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": openapi_tenancy.merge_paths(_paths()),
        "webhooks": {
            "modelsSync": {
                "post": {
                    "operationId": "modelsSync",
                    "summary": "POST <node>/api/models/sync: the router names changed models "
                    "(bearer: the node's sync_token)",
                    "requestBody": _request("SyncNotice"),
                    "responses": {"202": {"description": "Accepted"}},
                }
            }
        },
        "components": {
            "schemas": {**_SCHEMAS, **openapi_tenancy.SCHEMAS},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`sk-…` key; scopes api, node, admin",
                },
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "the same keys, as Anthropic's clients send them",
                },
            },
        },
    }
