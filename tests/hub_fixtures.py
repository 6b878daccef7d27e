"""Building hub repos on disk and starting the hub stand-in (``llmlb.testing.hub_standin``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from tests.conftest import GEMMA_CACHE
from tests.procs import Proc, free_port

#: Hash cache shared by every stand-in the tests start, so large files are hashed once per machine.
HASH_CACHE = GEMMA_CACHE / "hub-standin-hashes.json"


class HubUrl(str):
    """The stand-in's base URL (a ``str``) carrying its ``proc`` and ``root`` for tests."""

    proc: Proc
    root: Path


def make_repo(root: Path, repo_id: str, files: Mapping[str, bytes | Path]) -> Path:
    """Create ``root/<org>/<name>/`` holding ``files`` and return that directory.

    Args:
        root: the stand-in's ``--root``.
        repo_id: ``org/name``.
        files: path in the repo -> content; a ``Path`` is hard-linked (symlinked across file
            systems) rather than copied, so large real models cost nothing. Never modify a file
            a repo links to: tests that need a damaged file use the stand-in's ``corrupt`` fault
            or pass bytes.
    """
    org, name = repo_id.split("/")
    repo_dir = root / org / name
    repo_dir.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        dest = repo_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        if isinstance(content, Path):
            try:
                os.link(content, dest)
            except OSError:
                dest.symlink_to(content.resolve())
        else:
            dest.write_bytes(content)
    return repo_dir


def hub_argv(port: int, root: Path, *extra_args: str) -> list[str]:
    """Command line of the hub stand-in on loopback ``port`` serving ``root``.

    The sha256 cache is shared per machine unless ``extra_args`` names its own.
    """
    argv = [sys.executable, "-m", "llmlb.testing.hub_standin", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--root", str(root)]
    if "--hash-cache" not in extra_args:
        argv += ["--hash-cache", str(HASH_CACHE)]
    return [*argv, *extra_args]


def start_hub(spawn: Callable[..., Proc], root: Path, *extra_args: str) -> HubUrl:
    """Start ``python -m llmlb.testing.hub_standin`` on a free loopback port; return its base URL.

    Args:
        spawn: the ``spawn`` fixture (the process is stopped when the test ends).
        root: directory of ``<org>/<name>/`` repos.
        extra_args: more flags, e.g. ``"--bandwidth", "25M"`` or ``"--fault", "drop:after=10"``.
    """
    port = free_port()
    proc = spawn(hub_argv(port, root, *extra_args), name="hub")
    url = HubUrl(f"http://127.0.0.1:{port}")
    proc.wait_http(f"{url}/health", timeout=30)
    url.proc = proc
    url.root = root
    return url
