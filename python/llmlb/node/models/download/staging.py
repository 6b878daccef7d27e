"""A download's state on disk: verified-file records, the per-model lock, the downloaded
marker, and promotion of staged files into the store.

Paths follow the store's layout rules (:mod:`llmlb.model_storage`): staging under
``<models_dir>/.staging/<id>/`` (files in ``files/``, the record in ``verified.json``),
locks in ``.locks/``, markers in ``.downloaded/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
from filelock import FileLock

from llmlb.errors import DownloadError
from llmlb.files import atomic_write
from llmlb.model_storage import CHAT_TEMPLATE_FILENAME, downloaded_marker, lock_path
from llmlb.protocol import Manifest, ManifestFile

logger = logging.getLogger(__name__)

VERIFIED_FILENAME = "verified.json"


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary name, then a rename)."""
    atomic_write(path, orjson.dumps(data))


def model_lock(models_dir: Path, model_id: str) -> FileLock:
    """The cross-process lock guarding ``model_id``'s download and promotion."""
    path = lock_path(models_dir, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def was_downloaded(models_dir: Path, model_id: str) -> bool:
    """Whether ``model_id`` was downloaded from the router by a node on this store."""
    return downloaded_marker(models_dir, model_id).is_file()


def forget_downloaded(models_dir: Path, model_id: str) -> None:
    """Drop the downloaded-from-router record of ``model_id``."""
    downloaded_marker(models_dir, model_id).unlink(missing_ok=True)


def file_signature(path: Path) -> dict[str, int]:
    """What identifies a file's current bytes cheaply: size, mtime and inode (a rename keeps
    them; any rewrite changes them)."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def verified_stats(model_dir: Path, files: list[ManifestFile]) -> dict[str, dict]:
    """Per promoted file with a sha256: that digest and the file's signature, so a peer
    serving it later knows the bytes are still the ones verified."""
    stats = {}
    for spec in files:
        path = model_dir / spec.filename
        if spec.sha256 is not None and path.is_file():
            stats[spec.filename] = {"sha256": spec.sha256, **file_signature(path)}
    return stats


def read_marker(models_dir: Path, model_id: str) -> dict | None:
    """The downloaded marker of ``model_id`` (repo, revision, files, verified), if any."""
    try:
        data = orjson.loads(downloaded_marker(models_dir, model_id).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_verified(
    model_id: str, staging: Path, files_dir: Path, files: list[ManifestFile]
) -> dict[str, dict]:
    """Verified files kept from an earlier attempt; anything else in staging is removed."""
    try:
        recorded = orjson.loads((staging / VERIFIED_FILENAME).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        recorded = {}
    wanted = {f.filename: f for f in files}
    verified: dict[str, dict] = {}
    for name, info in recorded.items() if isinstance(recorded, dict) else ():
        spec = wanted.get(name)
        path = files_dir / name
        if (
            spec is not None
            and isinstance(info, dict)
            and path.is_file()
            and path.stat().st_size == spec.size_bytes == info.get("size")
            and (spec.sha256 is None or info.get("sha256") == spec.sha256)
        ):
            verified[name] = info
    for path in sorted(files_dir.rglob("*"), reverse=True):
        rel = path.relative_to(files_dir).as_posix()
        if path.is_file() and rel not in verified:
            path.unlink()
    write_json(staging / VERIFIED_FILENAME, verified)
    if verified:
        logger.info("%s: resuming, %d file(s) already verified", model_id, len(verified))
    return verified


def promote(
    store: Any,
    models_dir: Path,
    manifest: Manifest,
    files: list[ManifestFile],
    staging: Path,
) -> Any:
    """Check the staged files with the store's rules, then rename them into place.

    Args:
        store: the ``ModelStorage`` over ``models_dir``.
        models_dir: the store root.
        manifest: the model's manifest (its id, repo, revision and chat template).
        files: the files that were downloaded.
        staging: the model's staging directory (its ``files/`` are promoted).

    Returns:
        The store's ``ModelDescriptor`` of the promoted model.

    Raises:
        DownloadError: the files are invalid, the id conflicts with another model, or the
            promoted model does not validate.
    """
    from llmlb.model_storage import validate_file

    model_id = manifest.model_id
    files_dir = staging / "files"
    problems: list[str] = []
    for path in sorted(files_dir.rglob("*")):
        if path.suffix in (".gguf", ".safetensors") and path.is_file():
            problems += [f"{path.name}: {p}" for p in validate_file(path)]
    if problems:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{model_id}: downloaded files are invalid: " + "; ".join(problems))
    template = manifest.chat_template
    if template and not (files_dir / CHAT_TEMPLATE_FILENAME).exists():
        (files_dir / CHAT_TEMPLATE_FILENAME).write_text(template)
    target = store.model_dir(model_id)
    if (other := store.conflicting_model(model_id)) is not None:
        raise DownloadError(f"{model_id}: model id conflict with {other} in the store")
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():  # an earlier download of ours that no longer validates
        old = staging / "old"
        os.replace(target, old)
    os.replace(files_dir, target)
    marker = downloaded_marker(models_dir, model_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        marker,
        {
            "repo": manifest.repo,
            "revision": manifest.revision,
            "files": [f.filename for f in files],
            "downloaded_at": time.time(),
            "verified": verified_stats(target, files),
        },
    )
    shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    descriptor = store.resolve(model_id)
    if descriptor is None:
        reasons = "; ".join(store.validate(model_id)) or "rejected by the store"
        shutil.rmtree(target, ignore_errors=True)
        forget_downloaded(models_dir, model_id)
        raise DownloadError(f"{model_id}: downloaded model does not validate: {reasons}")
    return descriptor
