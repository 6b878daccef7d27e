"""The hub stand-in: a local Hugging Face hub for tests and benchmarks
(``python -m llmlb.testing.hub_standin``; see :mod:`.server` for routes and flags).

- :mod:`.server`: the aiohttp app, its routes and the command line.
- :mod:`.repos`: repositories on disk, commit shas, hashes and the LFS rule.
- :mod:`.faults`: the ``--fault`` specs (drops, statuses, corruption, delays, redirects).
"""
