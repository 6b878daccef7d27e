"""The router's HTTP surface: the app, routes as thin handlers, OpenAPI, the dashboard.

:mod:`.app` builds the ASGI app, :mod:`.routes` the control-plane handlers (by area),
:mod:`.openapi` the document (:mod:`.openapi_schemas`, :mod:`.openapi_paths`,
:mod:`.openapi_tenancy`), :mod:`.responses` auth helpers and JSON bodies, :mod:`.metrics`
the ``/metrics`` exposition, :mod:`.traffic` the dashboard's traffic history,
:mod:`.dashboard` the single-page UI.

May import :mod:`llmlb.router.proxy`, :mod:`llmlb.router.control`, :mod:`llmlb.router.db`;
nothing below imports this package.
"""
