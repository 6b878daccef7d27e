"""Verified, resumable, atomic model downloads from the hub (and from peer nodes of the
fleet, checked against the same sha256) into the node's store.

One model at a time per store (a file lock), files fetched straight from the hub URLs of the
router's manifest with ``hf_transfer`` parallel range requests, run in long-lived worker
processes shared by the whole node, several files of a model at once, each hashed while its
bytes arrive (:mod:`llmlb.node.models.hashing`), staged under ``<models_dir>/.staging/<id>/`` and
renamed into ``<models_dir>/<id>/`` only once every required file passed its size and
SHA-256 check. Verified files survive a crash or a kill and are not fetched again.

Modules, one job each:

- :mod:`.fetch`: :class:`~.fetch.ModelFetch`, one model's download (prepare, run, cancel).
- :mod:`.fetch_core`: a download's shared state, transfers, load ahead and progress.
- :mod:`.peer_fetch`: one file from a peer (the hub joining) or from the swarm.
- :mod:`.staging`: verified-file records, the download lock and marker, promotion.
- :mod:`.workers`: the transfer worker processes and their pool (and the child itself).
- :mod:`.sources`: one file's ranges from peers first and the hub for the rest (in a worker).
- :mod:`.http`: probes and single-stream GETs, redirects checked hop by hop.
- :mod:`.allowlist`: which hosts bytes (and the hub token) may come from.
- :mod:`.options`: :class:`~.options.DownloadOptions` and :class:`~.options.DownloadProgress`.
- :mod:`.signals`: the internal retry/refetch signals.

Errors callers handle live in :mod:`llmlb.errors` (``DownloadError`` and its subclasses);
the store's path rules (``.staging/``, ``.locks/``, ``.downloaded/``) in
:mod:`llmlb.model_storage`; the manifest types in :mod:`llmlb.protocol`; the manifest
request in :mod:`llmlb.node.models.router_client`; ``llmlb pull`` in :mod:`llmlb.cli.pull`.
"""
