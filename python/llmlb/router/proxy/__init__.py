"""The data plane: each inference request from a client to a node and back.

:mod:`.proxy` is the ASGI app (reading, admission, watches), :mod:`.forward` picks, fails
over and relays, :mod:`.node_care` keeps node pools, probes and failure counts,
:mod:`.exchange` one request's state, :mod:`.answers` the router's own error answers,
:mod:`.settings` the proxy's tuning; :mod:`.balancer` picks a node by one cost (prefix still
to prefill + load), :mod:`.wait_queue` holds requests waiting for a slot (fair share),
:mod:`.poison` the requests nodes failed, :mod:`.prefix_index` is the cache index behind
that cost (shared by a router's workers through :mod:`.index_bus`), :mod:`.upstream` the
pooled HTTP/1.1 connections to nodes (failing with :mod:`.upstream_errors`),
:mod:`.admission` (over :mod:`.key_state`) and :mod:`.usage` the keys' limits and usage,
:mod:`.metrics` the proxy's counters.

May import :mod:`llmlb.router.control` and :mod:`llmlb.router.db`; never
:mod:`llmlb.router.api`.
"""
