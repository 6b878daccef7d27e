"""llmlb.files.atomic_write: content, mode, first-writer-wins, no stray temporary files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from llmlb.files import atomic_write
from llmlb.private_file import write_private_file


def test_writes_bytes_and_text_creating_the_parent(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "f.json"
    assert atomic_write(path, b'{"x": 1}') is True
    assert path.read_bytes() == b'{"x": 1}'
    assert atomic_write(path, "ünïcode") is True
    assert path.read_text(encoding="utf-8") == "ünïcode"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]


def test_private_file_is_owner_only_even_over_a_wider_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)
    atomic_write(path, "new", private=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "new"
    write_private_file(tmp_path / "key", "k\n")
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600


def test_public_file_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_no_replace_keeps_the_first_writers_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.key"
    assert atomic_write(path, "first", replace=False) is True
    assert atomic_write(path, "second", replace=False) is False
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.key"]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "d"
    path.mkdir()  # a directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic_write(path, "x")
    assert path.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
