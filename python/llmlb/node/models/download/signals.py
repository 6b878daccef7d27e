"""Failure signals passed between the download modules (never raised to callers).

Kept apart so that a transfer worker child imports nothing it does not need.
"""

from __future__ import annotations


class Transient(Exception):
    """A failure worth retrying (5xx, dropped connection, timeout, a worker that died).

    ``detail``: a multi-source transfer's per-source summary, when there is one.
    """

    def __init__(self, message: str, detail: list[dict] | None = None):
        super().__init__(message)
        self.detail = detail


class Corrupt(Exception):
    """A file arrived with the wrong size or digest (refetched once)."""
