"""Who may call a node: its ``/v1/*`` routes, and its status and metrics off loopback.

With ``require_key`` (``--require-key`` / ``LLMLB_NODE_REQUIRE_KEY``) or
``require_router_token`` (``--router-auth``, on by default off loopback), a request must
carry that key (``Authorization: Bearer`` or ``x-api-key``) or the router's token for this
node (the proxy sends it with every forwarded request).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.requests import Request

from llmlb.errors import invalid_api_key
from llmlb.http import api_key

if TYPE_CHECKING:
    from llmlb.node.service import Node


def check_key(node: Node, request: Request) -> None:
    """Enforce ``require_key`` / ``require_router_token`` on a ``/v1/*`` request.

    Raises:
        ApiError: 401 ``invalid_api_key`` when a credential is required and not presented
            (any header bytes, non-ASCII included, are just a wrong credential).
    """
    settings = node.settings
    if not settings.require_key and not settings.require_router_token:
        return
    authorization = request.headers.get("authorization")
    if settings.require_router_token and node.sync.check_sync_token(authorization):
        return
    token = api_key(authorization, request.headers.get("x-api-key"))
    if (
        settings.require_key
        and token is not None
        and hmac.compare_digest(token, settings.require_key.encode())
    ):
        return
    raise invalid_api_key("API key for this node")


def check_off_loopback(node: Node, request: Request) -> None:
    """Status and metrics routes: open on loopback, the router's token or the node's key off it.

    Raises:
        ApiError: 401 ``invalid_api_key``.
    """
    if node.settings.require_router_token:
        check_key(node, request)
