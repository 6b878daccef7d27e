"""The data plane: each inference request from a client to a node and back.

:mod:`.proxy` streams requests and answers, :mod:`.balancer` picks a node by one cost
(prefix still to prefill + load) and holds the wait queue, :mod:`.prefix_index` is the cache
index behind that cost, :mod:`.upstream` the pooled HTTP/1.1 connections to nodes,
:mod:`.metrics` the proxy's counters.

May import :mod:`llmlb.router.control` and :mod:`llmlb.router.db`; never
:mod:`llmlb.router.api`.
"""
