"""The router's web dashboard: static files shipped in this package, served at ``/dashboard``.

The page is a single-page app (``index.html``, ``app.js``, ``app.css``) with no build step
and nothing fetched from elsewhere; it talks only to the router's JSON API with the admin
key the operator types in (kept in ``sessionStorage``, sent as ``Authorization: Bearer``).
Serving it needs no key: it holds no data. Every file goes out with a strict
Content-Security-Policy (no inline script or style, nothing but this origin) and
``X-Frame-Options: DENY``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from llmlb.errors import ApiError

#: Files the dashboard is made of, and their media types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    """The bytes of one dashboard file (read from the package once)."""
    return resources.files(__name__).joinpath(name).read_bytes()


def _serve(name: str) -> Response:
    return Response(asset(name), headers=SECURITY_HEADERS, media_type=ASSETS[name])


async def dashboard_page(request: Request) -> Response:
    """``GET /dashboard``: the single page."""
    return _serve("index.html")


async def dashboard_file(request: Request) -> Response:
    """``GET /dashboard/{name}``: the page's script, style sheet and icon."""
    name = request.path_params["name"]
    if name not in ASSETS or name == "index.html":
        raise ApiError(404, "not_found", "no such dashboard file")
    return _serve(name)


__all__ = [
    "ASSETS",
    "CONTENT_SECURITY_POLICY",
    "SECURITY_HEADERS",
    "asset",
    "dashboard_file",
    "dashboard_page",
]
