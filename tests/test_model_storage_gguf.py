"""GGUF validation: headers, quantisation, truncation, alignment and split sets."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from llmlb.model_storage import ModelStorage, inspect_gguf, validate_file

from tests.factories import split_name, write_gguf, write_gguf_model, write_split_gguf


@pytest.fixture
def store(tmp_path: Path) -> ModelStorage:
    return ModelStorage(tmp_path / "models")


def _only(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


def test_valid_gguf_resolves_with_header_metadata(store: ModelStorage) -> None:
    path = write_gguf_model(
        store.models_dir,
        "org/tiny",
        "tiny.gguf",
        arch="qwen2",
        file_type="Q5_K_M",
        context_length=4096,
    )
    assert store.validate("org/tiny") == []
    d = store.resolve("Org/Tiny")
    assert d is not None
    assert (d.id, d.format, d.primary_path, d.files) == ("org/tiny", "gguf", path, (path,))
    assert (d.architecture, d.quantization, d.context_length) == ("qwen2", "Q5_K_M", 4096)
    assert d.size_bytes == path.stat().st_size
    assert store.detect_format("org/tiny") == "gguf"


@pytest.mark.parametrize(
    ("file_type", "name"),
    [
        (0, "F32"),
        (1, "F16"),
        (7, "Q8_0"),
        (15, "Q4_K_M"),
        (18, "Q6_K"),
        (30, "IQ4_XS"),
        (32, "BF16"),
        (38, "MXFP4_MOE"),
    ],
)
def test_quantisation_comes_from_general_file_type(
    tmp_path: Path, file_type: int, name: str
) -> None:
    path = write_gguf(tmp_path / "model.gguf", file_type=file_type)
    assert inspect_gguf(path)["quantization"] == name


def test_quantisation_falls_back_to_the_file_name(store: ModelStorage) -> None:
    write_gguf_model(store.models_dir, "m", "m-IQ3_XXS.gguf", file_type=None)
    d = store.resolve("m")
    assert d is not None and d.quantization == "IQ3_XXS"


def test_gguf_written_by_the_gguf_package_validates(store: ModelStorage) -> None:
    directory = store.models_dir / "pkg"
    directory.mkdir(parents=True)
    writer = gguf.GGUFWriter(str(directory / "pkg.gguf"), "gemma3")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(8192)
    writer.add_token_list([f"tok{i}" for i in range(500)])
    writer.add_token_scores([0.5] * 500)
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_tensor("a", np.zeros((4, 64), dtype=np.float32))
    writer.add_tensor("b", np.zeros((3,), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert store.validate("pkg") == []
    d = store.resolve("pkg")
    assert d is not None
    assert (d.architecture, d.quantization, d.context_length) == ("gemma3", "Q8_0", 8192)
    info = inspect_gguf(d.primary_path)
    reader = gguf.GGUFReader(d.primary_path)
    assert info["data_offset"] == reader.data_offset
    assert info["tensor_count"] == 2


def test_real_gemma_gguf(store: ModelStorage, gemma_gguf: Path) -> None:
    directory = store.models_dir / "google" / "gemma-3-270m"
    directory.mkdir(parents=True)
    (directory / gemma_gguf.name).symlink_to(gemma_gguf)
    d = store.resolve("google/gemma-3-270m")
    assert d is not None, store.validate("google/gemma-3-270m")
    assert (d.architecture, d.quantization) == ("gemma3", "Q4_K_M")
    assert d.size_bytes == gemma_gguf.stat().st_size
    assert store.list_available() == ["google/gemma-3-270m"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"magic": b"GGML"}, "bad magic: expected 'GGUF', got 'GGML'"),
        ({"version": 1}, "unsupported GGUF version 1"),
        ({"version": 4}, "unsupported GGUF version 4"),
        ({"alignment": 48}, "general.alignment 48 is not a power of two"),
        ({"extra_kv": {"general.alignment": "32"}}, "general.alignment has type string"),
        (
            {"misalign": True, "tensors": [("a", (3,), "F32"), ("b", (3,), "F32")]},
            "tensor data not aligned for mmap: tensor 'b' at offset 12",
        ),
        ({"truncate": True}, "truncated tensor data: tensor 'output_norm.weight' ends at byte"),
        ({"extra_kv": {"general.architecture": 7}}, "general.architecture has type uint32"),
    ],
)
def test_corrupt_gguf_is_named_precisely(tmp_path: Path, kwargs: dict, expected: str) -> None:
    path = write_gguf(tmp_path / "bad.gguf", **kwargs)
    problem = _only(validate_file(path))
    assert problem.startswith("bad.gguf: ")
    assert expected in problem


def test_truncated_header_and_tiny_files(tmp_path: Path) -> None:
    raw = tmp_path / "ok.gguf"
    write_gguf(raw)
    data = raw.read_bytes()
    (tmp_path / "tiny.gguf").write_bytes(b"GG")
    assert "file too small to be GGUF (2 bytes)" in _only(validate_file(tmp_path / "tiny.gguf"))
    (tmp_path / "head.gguf").write_bytes(data[:20])
    assert "truncated header" in _only(validate_file(tmp_path / "head.gguf"))
    (tmp_path / "meta.gguf").write_bytes(data[:60])
    problem = _only(validate_file(tmp_path / "meta.gguf"))
    assert "truncated header" in problem or "impossible" in problem
    # Absurd tensor count for the file size.
    bad = bytearray(data)
    bad[8:16] = struct.pack("<Q", 10**12)
    (tmp_path / "count.gguf").write_bytes(bytes(bad))
    assert "tensor count 1000000000000 is impossible" in _only(
        validate_file(tmp_path / "count.gguf")
    )
    # A string length running past the end of the file.
    bad = bytearray(data)
    bad[24:32] = struct.pack("<Q", 1 << 40)
    (tmp_path / "str.gguf").write_bytes(bytes(bad))
    assert "truncated header: metadata" in _only(validate_file(tmp_path / "str.gguf"))


def test_truncated_gguf_model_does_not_resolve(store: ModelStorage) -> None:
    write_gguf_model(store.models_dir, "cut", truncate=1)
    assert store.resolve("cut") is None
    assert "truncated tensor data" in _only(store.validate("cut"))
    assert store.list_available() == []


def test_split_gguf_complete(store: ModelStorage) -> None:
    directory = store.models_dir / "big"
    paths = write_split_gguf(directory, "big-Q4_K_M", 3, arch="llama", file_type="Q4_K_M")
    assert store.validate("big") == []
    d = store.resolve("big")
    assert d is not None
    assert d.primary_path == directory / split_name("big-Q4_K_M", 1, 3)
    assert list(d.files) == paths
    assert d.quantization == "Q4_K_M" and d.architecture == "llama"
    assert d.size_bytes == sum(p.stat().st_size for p in paths)


def test_split_gguf_missing_split(store: ModelStorage) -> None:
    write_split_gguf(store.models_dir / "big", "big", 4, skip=[3])
    assert store.resolve("big") is None
    assert _only(store.validate("big")) == "missing split 3 of 4: big-00003-of-00004.gguf"


def test_split_gguf_count_mismatch(store: ModelStorage) -> None:
    write_split_gguf(store.models_dir / "big", "big", 3, header_counts={2: 4})
    problem = _only(store.validate("big"))
    assert problem == (
        "big-00002-of-00003.gguf: split count mismatch: header says split.count=4, file name says 3"
    )


def test_split_gguf_number_and_tensor_count_mismatch(store: ModelStorage) -> None:
    directory = store.models_dir / "big"
    write_split_gguf(directory, "big", 2)
    write_gguf(directory / split_name("big", 2, 2), split=(1, 2), arch=None, file_type=None)
    assert "split number mismatch: header says split.no=0" in _only(store.validate("big"))
    write_split_gguf(directory, "big", 2, split_tensors_count=5)
    assert "split.tensors.count says 5 but the splits hold 2 tensors" in _only(
        store.validate("big")
    )


def test_split_gguf_truncated_later_split(store: ModelStorage) -> None:
    directory = store.models_dir / "big"
    write_split_gguf(directory, "big", 2)
    write_gguf(
        directory / split_name("big", 2, 2),
        split=(2, 2),
        arch=None,
        file_type=None,
        tensors=[("blk.1.weight", (32,), "F32")],
        truncate=8,
    )
    assert "big-00002-of-00002.gguf: truncated tensor data" in _only(store.validate("big"))


def test_single_file_claiming_to_be_split(store: ModelStorage) -> None:
    write_gguf_model(store.models_dir, "odd", "odd.gguf", split=(1, 2))
    assert "header says split.count=2 but the file name has no" in _only(store.validate("odd"))


def test_unknown_tensor_type(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", tensors=[("zz_tensor", (32,), "F32")])
    data = bytearray(path.read_bytes())
    # Tensor info: name (u64 length + bytes), n_dims u32, dims u64 each, type u32, offset u64.
    type_at = data.index(struct.pack("<Q", 9) + b"zz_tensor") + 8 + 9 + 4 + 8
    data[type_at : type_at + 4] = struct.pack("<I", 99)
    path.write_bytes(bytes(data))
    assert "tensor 'zz_tensor' has unknown ggml type 99" in _only(validate_file(path))
