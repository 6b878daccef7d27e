"""What every route handler uses: the worker's runtime, the scope check, the model id of a
path, the presented key, and the handlers' logger.

Apart so that the route modules by area share them without importing each other.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import Response

from llmlb.http import api_key, model_id_or_400
from llmlb.router.api.responses import authorize
from llmlb.router.runtime import Runtime

logger = logging.getLogger("llmlb.router")

Endpoint = Callable[[Request], Awaitable[Response]]


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _guard(request: Request, scope: str | None) -> Runtime:
    runtime = _runtime(request)
    authorize(request, runtime.keys, scope)
    return runtime


def _path_model_id(request: Request) -> str:
    # Accept ``org/name`` and ``org%2Fname`` alike, whether or not the server decoded the path.
    return model_id_or_400(unquote(request.path_params["model_id"]))


def _bearer(request: Request) -> bytes | None:
    return api_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
