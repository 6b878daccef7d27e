"""A node's models on disk: their states, the serve decision, downloads and peers.

:mod:`.resolver` owns model state (node-first resolution, delete, retry) over
:mod:`.table` (the store's models, records and reports), :mod:`.download`
fetches verified files from the hub and peers, :mod:`.peers` serves this node's verified
files to the fleet, :mod:`.hashing` hashes files while they land, :mod:`.runtimes` says what
this node's runtimes can serve, :mod:`.router_client` is the one async client for the
routers (one failover rule), :mod:`.membership` what the router made of this node and
:mod:`.identity` its persistent id (downloads name the node when they ask for peers).

May import shared modules and the node's :mod:`~llmlb.node.events`, :mod:`~llmlb.node.metrics`;
never :mod:`llmlb.node.api`, :mod:`llmlb.node.inference` or :mod:`llmlb.node.fleet`.
"""
