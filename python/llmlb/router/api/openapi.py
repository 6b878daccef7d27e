"""The router's OpenAPI 3.1 document, written by hand next to the routes it describes.

The document is assembled here from its components (:mod:`.openapi_schemas`) and operations
(:mod:`.openapi_paths`), with the tenancy routes' own (:mod:`.openapi_tenancy`).
"""

from __future__ import annotations

from functools import cache

from llmlb import __version__
from llmlb.router.api import openapi_tenancy
from llmlb.router.api.openapi_paths import _paths, _request
from llmlb.router.api.openapi_schemas import _SCHEMAS


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
