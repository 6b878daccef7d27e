"""The operations of the router's OpenAPI document: every path, its parameters, bodies,
answers and errors, and the links between operations.

Apart from :mod:`.openapi_schemas` (the components these refer to by name).
"""

from __future__ import annotations

from llmlb.router.api.openapi_schemas import _ref


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
