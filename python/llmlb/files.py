"""Writing small files atomically: the one rule every module that persists state follows.

A reader sees either the old file or the new one, never a half-written one, and a crash
leaves at most a stray temporary file (a dot-name with the writer's pid) next to the target.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def atomic_write(
    path: Path, data: bytes | str, *, private: bool = False, replace: bool = True
) -> bool:
    """Write ``data`` to ``path`` atomically and durably.

    The bytes go to a temporary file in the same directory, which is fsynced, then renamed
    over ``path`` (or hard-linked to it when ``replace`` is false); the directory is fsynced
    last so the rename survives a crash. The parent directory is created when missing.

    Args:
        path: the file to write.
        data: its new content (``str`` is encoded as UTF-8).
        private: create the file with mode 0600 (owner only), for secrets.
        replace: replace an existing file (the default); when false, an existing file is
            kept as it is and nothing is written (the first writer wins, across processes).

    Returns:
        Whether ``path`` now holds ``data`` (false only when ``replace`` is false and the
        file existed).

    Raises:
        OSError: the directory or the file cannot be written.
    """
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mode = 0o600 if private else 0o666
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            if private:
                os.fchmod(fd, 0o600)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
            written = True
        else:
            try:
                os.link(tmp, path)  # atomic, and never replaces a file another process made
                written = True
            except FileExistsError:
                written = False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return written


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
