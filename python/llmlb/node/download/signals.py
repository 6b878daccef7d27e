"""Failure signals passed between the download modules (never raised to callers).

Kept apart so that a transfer worker child imports nothing it does not need.
"""

from __future__ import annotations


class Transient(Exception):
    """A failure worth retrying (5xx, dropped connection, timeout, a worker that died)."""


class Corrupt(Exception):
    """A file arrived with the wrong size or digest (refetched once)."""
