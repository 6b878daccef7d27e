"""The control plane: what the fleet is and who may use it.

:mod:`.registry` (models and manifests), :mod:`.nodes` (registration, heartbeats,
enrollment), :mod:`.keys` (API keys and scopes), :mod:`.peers` (which nodes may serve a
model's bytes to which), :mod:`.sync` and :mod:`.outbox` (notifying nodes), :mod:`.leader`
(one router runs the background duties), :mod:`.fleet` (one worker's in-memory view of nodes
and models, read by the proxy), :mod:`.settings` (the router's settings). The worker's wiring
of all of these is :mod:`llmlb.router.runtime`.

May import :mod:`llmlb.router.db` and shared modules; never :mod:`llmlb.router.api`.
"""
