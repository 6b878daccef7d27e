"""SHA-256 of a file while another process is still writing it.

``hf_transfer`` writes a file as parallel ranges, each chunk at its own offset. The
:class:`FollowingHasher` thread hashes the contiguous prefix that has landed so far, found
with ``SEEK_HOLE`` (ranges not written yet are holes in the sparse file), so that almost all
of the hashing overlaps the transfer; the tail, once the file has its full size, is read
through ``mmap`` without a copy. Reading a page while it is being written can give a
wrong digest, never a wrong "match": callers re-hash serially when the streamed digest
disagrees before declaring the file corrupt (:func:`sha256_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
from pathlib import Path
from typing import Any

BLOCK = 4 << 20


def sha256_file(path: Path, block: int = BLOCK) -> str:
    """The SHA-256 hex digest of the whole file at ``path``."""
    digest = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


class FollowingHasher(threading.Thread):
    """Hash ``path`` front to back as its bytes arrive; :meth:`finish` returns the digest.

    Args:
        path: the file being written (it may not exist yet).
        size: its final size in bytes.
        block: read size.
    """

    def __init__(self, path: Path, size: int, block: int = BLOCK):
        super().__init__(name=f"hash:{path.name}", daemon=True)
        self.path = path
        self.size = size
        self.block = block
        self.hashed = 0
        self._digest = hashlib.sha256()
        self._wake = threading.Event()
        self._writer_done = threading.Event()
        self._abort = threading.Event()
        self._error: BaseException | None = None

    def poke(self) -> None:
        """Tell the hasher that more bytes may have landed."""
        self._wake.set()

    def abort(self) -> None:
        """Stop hashing (the transfer failed)."""
        self._abort.set()
        self._wake.set()

    def finish(self) -> str:
        """Mark the file complete, hash what is left and return the hex digest."""
        self._writer_done.set()
        self._wake.set()
        self.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def run(self) -> None:
        try:
            self._follow()
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
            self._error = exc

    def _wait(self) -> None:
        self._wake.wait(0.05)
        self._wake.clear()

    def _follow(self) -> None:
        fd = -1
        reader: _Reader | None = None
        try:
            while self.hashed < self.size and not self._abort.is_set():
                done = self._writer_done.is_set()
                if fd < 0:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except FileNotFoundError:
                        if done:
                            raise
                        self._wait()
                        continue
                end = self.size if done else self._data_end(fd)
                if end <= self.hashed:
                    self._wait()
                    continue
                if reader is None:
                    reader = _Reader(fd, self.size, self.block)
                reader.try_map()
                while self.hashed < end and not self._abort.is_set():
                    n = reader.update(self._digest, self.hashed, end)
                    if n <= 0:
                        break
                    self.hashed += n
                if done and self.hashed < self.size:
                    raise OSError(f"{self.path} is shorter than {self.size} bytes")
        finally:
            if reader is not None:
                reader.close()
            if fd >= 0:
                os.close(fd)

    def _data_end(self, fd: int) -> int:
        """End of the written region that starts at the current position."""
        try:
            return min(os.lseek(fd, self.hashed, os.SEEK_HOLE), self.size)
        except OSError:  # position at/after EOF: nothing new
            return self.hashed


class _Reader:
    """Feeds file regions to a digest: via ``preadv`` into one reused buffer while the file
    grows, then straight from a read-only ``mmap`` (no copy) once it has its full size
    (``hf_transfer`` extends the file as ranges land; never mapped beyond its end)."""

    def __init__(self, fd: int, size: int, block: int):
        self.block = block
        self.size = size
        self._fd = fd
        self._buf: memoryview | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def try_map(self) -> None:
        """Map the file if it now has its full size (no-op once mapped)."""
        if self._view is not None or self.size <= 0:
            return
        if os.fstat(self._fd).st_size < self.size:
            return
        self._map = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ)
        with contextlib.suppress(OSError, AttributeError):
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        self._view = memoryview(self._map)
        self._buf = None

    def update(self, digest: Any, start: int, end: int) -> int:
        """Hash up to one block from ``start`` (below ``end``); returns the bytes hashed."""
        want = min(self.block, end - start)
        if self._view is not None:
            digest.update(self._view[start : start + want])
            return want
        if self._buf is None:
            self._buf = memoryview(bytearray(self.block))
        n = os.preadv(self._fd, [self._buf[:want]], start)
        if n > 0:
            digest.update(self._buf[:n])
        return n

    def close(self) -> None:
        """Release the mapping."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
