"""Repository snapshots for the hub stand-in: file listing, git/LFS ids and commit shas.

A repository is a directory ``ROOT/<org>/<name>/``; every regular file below it (symlinks
followed, ``.git`` and ``.cache`` directories skipped) is a repo file. A file is stored "in LFS"
when :func:`is_lfs` says so; LFS files carry a sha256 and their git blob id is the id of their
LFS pointer file, exactly as on the hub. The commit sha is a sha1 over the sorted
``(path, blob id)`` pairs, so it changes when any file's content changes and is otherwise stable.

Hashes are computed in a thread pool, memoised per ``(device, inode, size, mtime)`` and optionally
persisted to a JSON file so that repeated stand-in start-ups never re-hash large files.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import orjson

from llmlb.files import atomic_write

logger = logging.getLogger(__name__)

#: Files at least this large are stored in LFS (the hub rejects plain git files over 10 MB).
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
#: Extensions stored in LFS whatever their size (the hub's default ``.gitattributes`` plus GGUF).
LFS_SUFFIXES = frozenset(
    {
        ".gguf",
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".onnx",
        ".h5",
        ".msgpack",
        ".model",
        ".npy",
        ".npz",
        ".pkl",
        ".ot",
        ".tflite",
        ".arrow",
        ".parquet",
        ".zip",
        ".tar",
        ".gz",
        ".xz",
        ".zst",
    }
)
_SKIPPED_DIRS = frozenset({".git", ".cache"})


def is_lfs(path: str, size: int) -> bool:
    """Whether ``path`` is served as an LFS file (sha256, ``X-Linked-*`` headers)."""
    return size >= LFS_THRESHOLD_BYTES or PurePosixPath(path).suffix.lower() in LFS_SUFFIXES


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file git stores for an LFS object."""
    text = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    return text.encode()


def git_blob_id(content: bytes) -> str:
    """Git's object id of a blob holding ``content``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    """One file of a repo snapshot."""

    path: str
    abspath: Path
    size: int
    blob_id: str
    sha256: str | None
    pointer_size: int | None
    mtime: float

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        """The hub's ETag: the sha256 of an LFS file, else its git blob id."""
        return self.sha256 or self.blob_id


@dataclass
class RepoSnapshot:
    """A repo's files at one (current) commit."""

    repo_id: str
    sha: str
    files: dict[str, RepoFile]
    dirs: dict[str, str] = field(default_factory=dict)  # directory path -> tree id
    last_modified: float = 0.0
    signature: tuple = ()

    def last_modified_iso(self) -> str:
        stamp = datetime.fromtimestamp(self.last_modified, UTC)
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"

    def resolves(self, revision: str) -> bool:
        """Whether ``revision`` (a branch name or the commit sha) names this snapshot."""
        return revision in ("main", self.sha)


def _hash_file(path: Path, size: int) -> tuple[str, str | None, int | None]:
    """``(blob_id, sha256 | None, pointer_size | None)`` of one file."""
    with open(path, "rb") as fh:
        if is_lfs(path.name, size):
            sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
            pointer = lfs_pointer(sha256, size)
            return git_blob_id(pointer), sha256, len(pointer)
        return git_blob_id(fh.read()), None, None


class HashCache:
    """Memoised file hashes keyed by ``dev:inode:size:mtime_ns``, optionally persisted."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, list] = {}
        self._dirty = False
        if path is not None:
            try:
                data = orjson.loads(path.read_bytes())
                if isinstance(data, dict):
                    self._entries = data
            except (OSError, orjson.JSONDecodeError):
                pass

    @staticmethod
    def key(st: os.stat_result) -> str:
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def get(self, key: str) -> tuple[str, str | None, int | None] | None:
        entry = self._entries.get(key)
        return tuple(entry) if entry else None  # type: ignore[return-value]

    def put(self, key: str, value: tuple[str, str | None, int | None]) -> None:
        self._entries[key] = list(value)
        self._dirty = True

    def save(self) -> None:
        """Merge into the file and write it atomically (other stand-ins may share it)."""
        if self.path is None or not self._dirty:
            return
        try:
            on_disk = orjson.loads(self.path.read_bytes())
            if isinstance(on_disk, dict):
                self._entries = {**on_disk, **self._entries}
        except (OSError, orjson.JSONDecodeError):
            pass
        try:
            atomic_write(self.path, orjson.dumps(self._entries))
            self._dirty = False
        except OSError as exc:
            logger.warning("could not write hash cache %s: %s", self.path, exc)


def _walk(repo_dir: Path) -> list[tuple[str, Path, os.stat_result]]:
    """Every file of a repo directory as ``(posix path, absolute path, stat)``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(repo_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for name in filenames:
            abspath = Path(dirpath) / name
            try:
                st = abspath.stat()
            except OSError:
                continue  # dangling symlink or file removed meanwhile
            rel = abspath.relative_to(repo_dir).as_posix()
            found.append((rel, abspath, st))
    found.sort(key=lambda item: item[0])
    return found


def _tree_ids(files: Iterable[RepoFile]) -> dict[str, str]:
    """A deterministic tree id for every directory that holds files."""
    members: dict[str, list[str]] = {}
    for f in files:
        parts = f.path.split("/")
        for depth in range(1, len(parts)):
            members.setdefault("/".join(parts[:depth]), []).append(f"{f.path} {f.blob_id}")
    return {d: hashlib.sha1("\n".join(lines).encode()).hexdigest() for d, lines in members.items()}


class RepoStore:
    """Finds repos under ``root`` and keeps an up-to-date snapshot of each."""

    def __init__(self, root: Path, hash_cache: Path | None = None, workers: int = 4):
        self.root = root
        self._cache = HashCache(hash_cache)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="standin-hash")
        self._snapshots: dict[str, RepoSnapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._cache.save()

    def repo_ids(self) -> list[str]:
        """Every ``org/name`` directory under the root."""
        ids: list[str] = []
        for org in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if org.name.startswith("."):
                continue
            ids.extend(f"{org.name}/{name.name}" for name in sorted(org.iterdir()) if name.is_dir())
        return ids

    def _find_dir(self, repo_id: str) -> tuple[str, Path] | None:
        """Canonical id and directory of ``repo_id`` (matched case-insensitively, as the hub)."""
        parts = repo_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        direct = self.root / parts[0] / parts[1]
        if direct.is_dir():
            return repo_id, direct
        wanted = repo_id.lower()
        for candidate in self.repo_ids():
            if candidate.lower() == wanted:
                return candidate, self.root / candidate
        return None

    async def snapshot(self, repo_id: str, rescan: bool = True) -> RepoSnapshot | None:
        """The repo's current snapshot, or ``None`` when no such repo exists.

        Args:
            repo_id: ``org/name``.
            rescan: re-list the directory and re-index changed files; ``False`` reuses the last
                snapshot when there is one (the download hot path).
        """
        if not rescan and (snap := self._snapshots.get(repo_id)) is not None:
            return snap
        found = self._find_dir(repo_id)
        if found is None:
            return None
        canonical, repo_dir = found
        lock = self._locks.setdefault(canonical, asyncio.Lock())
        async with lock:
            loop = asyncio.get_running_loop()
            listing = await loop.run_in_executor(self._pool, _walk, repo_dir)
            signature = tuple((rel, HashCache.key(st)) for rel, _, st in listing)
            current = self._snapshots.get(canonical)
            if current is not None and current.signature == signature:
                return current
            snap = await self._index(canonical, listing, signature)
            self._snapshots[canonical] = snap
            if canonical != repo_id:
                self._snapshots[repo_id] = snap
            return snap

    async def _index(self, repo_id: str, listing: list, signature: tuple) -> RepoSnapshot:
        loop = asyncio.get_running_loop()
        keys = [HashCache.key(st) for _, _, st in listing]
        pending = {}
        for (_, abspath, st), key in zip(listing, keys, strict=True):
            if self._cache.get(key) is None and key not in pending:
                pending[key] = loop.run_in_executor(self._pool, _hash_file, abspath, st.st_size)
        if pending:
            results = await asyncio.gather(*pending.values())
            for key, value in zip(pending, results, strict=True):
                self._cache.put(key, value)
            self._cache.save()
        files = {}
        for (rel, abspath, st), key in zip(listing, keys, strict=True):
            blob_id, sha256, pointer_size = self._cache.get(key)  # type: ignore[misc]
            files[rel] = RepoFile(
                rel, abspath, st.st_size, blob_id, sha256, pointer_size, st.st_mtime
            )
        commit = hashlib.sha1(
            "".join(f"{f.path}\0{f.blob_id}\n" for f in files.values()).encode()
        ).hexdigest()
        last_modified = max((f.mtime for f in files.values()), default=0.0)
        return RepoSnapshot(
            repo_id, commit, files, _tree_ids(files.values()), last_modified, signature
        )
