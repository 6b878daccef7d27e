"""Writing secrets (keys) to disk: owner-only and atomic (:func:`llmlb.files.atomic_write`)."""

from __future__ import annotations

from pathlib import Path

from llmlb.files import atomic_write


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (temporary name, then rename).

    The parent directory is created when missing.
    """
    atomic_write(path, text, private=True)
