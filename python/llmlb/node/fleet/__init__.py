"""A node's life in the fleet: registration, heartbeats, sync, cache reports.

:mod:`.sync` registers and heartbeats with every router and acts on sync notifications;
:mod:`.cache_reports` publishes what the prompt caches gain and lose. Both report on the
other packages, so this one sits above them: it may import :mod:`llmlb.node.inference` and
:mod:`llmlb.node.models`; only the node's wiring (:mod:`llmlb.node.service`) imports it.
"""
