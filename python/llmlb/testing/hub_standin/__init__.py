"""The hub stand-in: a local Hugging Face hub for tests and benchmarks
(``python -m llmlb.testing.hub_standin``; see :mod:`.server` for routes and flags).

- :mod:`.server`: the command line (and the routes and flags, documented there).
- :mod:`.app`: the aiohttp app: auth, request log, faults, metadata and download routes.
- :mod:`.repos`: repositories on disk, commit shas, hashes and the LFS rule.
- :mod:`.faults`: the ``--fault`` specs (drops, statuses, corruption, delays, redirects).
"""
