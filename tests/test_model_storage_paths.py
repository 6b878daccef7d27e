"""llmlb.model_storage.is_safe_relative_path: the store's one rule for file names."""

from __future__ import annotations

import pytest
from llmlb.errors import DownloadError
from llmlb.model_storage import is_safe_relative_path
from llmlb.node.models.download.fetch import select_files
from llmlb.protocol import Manifest, ManifestFile

SAFE = ["model.gguf", "sub/dir/model-00001-of-00002.gguf", ".hidden", "a/.b", "a..b", "é.json"]
UNSAFE = ["", "/etc/passwd", "a//b", "a/", "./a", "a/./b", "..", "a/../b", "a\\b", "a\0b", "C:x"]


@pytest.mark.parametrize("name", SAFE)
def test_safe_names(name: str) -> None:
    assert is_safe_relative_path(name)


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_names(name: str) -> None:
    assert not is_safe_relative_path(name)


@pytest.mark.parametrize("name", UNSAFE[1:])
def test_download_refuses_a_manifest_naming_an_unsafe_file(name: str) -> None:
    manifest = Manifest(
        model_id="org/m",
        files=(ManifestFile(filename=name, size_bytes=1, sha256=None, url="http://hub/x"),),
    )
    with pytest.raises(DownloadError, match="unsafe filename"):
        select_files(manifest, backends=[])
