"""safetensors validation: headers, offsets, sizes, sharded indexes and companion files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from llmlb.model_storage import ModelStorage, validate_file

from tests.factories import (
    shard_name,
    write_config,
    write_safetensors,
    write_safetensors_model,
    write_tokenizer,
)


@pytest.fixture
def store(tmp_path: Path) -> ModelStorage:
    return ModelStorage(tmp_path / "models")


def _only(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


def test_single_file_model_resolves(store: ModelStorage) -> None:
    directory = store.models_dir / "org" / "st"
    primary = write_safetensors_model(directory)
    assert store.validate("org/st") == []
    d = store.resolve("org/st")
    assert d is not None
    assert (d.format, d.primary_path, d.architecture, d.quantization) == (
        "safetensors",
        primary,
        "llama",
        None,
    )
    assert set(d.files) == {directory / "config.json", directory / "tokenizer.json", primary}
    assert d.size_bytes == sum(p.stat().st_size for p in d.files)
    assert store.detect_format("org/st") == "safetensors"


def test_sharded_model_resolves(store: ModelStorage) -> None:
    directory = store.models_dir / "sharded"
    index = write_safetensors_model(directory, shards=4, tensors_per_shard=3)
    d = store.resolve("sharded")
    assert d is not None, store.validate("sharded")
    assert d.primary_path == index
    assert {directory / shard_name(k, 4) for k in range(1, 5)} <= set(d.files)


def test_file_written_by_the_safetensors_package_validates(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file(
        {
            "a": np.zeros((3, 5), np.float16),
            "b": np.ones(7, np.int64),
            "c": np.zeros((2, 2, 2), np.uint8),
        },
        str(path),
        metadata={"format": "pt"},
    )
    assert validate_file(path) == []


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"header_len": 200_000_000}, "header too large: 200000000 bytes (limit 100000000)"),
        ({"header_len": 5000}, "header length 5000 exceeds the file size"),
        ({"raw_header": b"{not json"}, "header is not valid JSON: invalid JSON at byte 1"),
        ({"raw_header": b"[1, 2]"}, "header is not a JSON object"),
        (
            {
                "raw_header": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
            },
            "duplicate tensor a",
        ),
        (
            {"tensors": {"x": ("F32", (2,)), "y": ("F32", (2,))}, "offsets": {"y": (12, 20)}},
            "data_offsets not contiguous at tensor y: starts at 12, expected 8",
        ),
        (
            {"tensors": {"x": ("F32", (2,))}, "offsets": {"x": (4, 12)}},
            "data_offsets not contiguous at tensor x: starts at 4, expected 0",
        ),
        (
            {"tensors": {"x": ("F32", (2, 2))}, "offsets": {"x": (0, 12)}},
            "tensor x: F32 shape needs 16 bytes but data_offsets span 12",
        ),
        ({"extra_bytes": 3}, "file size mismatch: expected"),
        ({"truncate": 5}, "file size mismatch: expected"),
        (
            {"raw_header": b'{"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}'},
            "tensor w: unknown dtype F33",
        ),
        (
            {"raw_header": b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}'},
            "tensor w: invalid shape",
        ),
        (
            {"raw_header": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}'},
            "tensor w: data_offsets end 0 before begin 4",
        ),
        (
            {"raw_header": b'{"w": {"dtype": "F32", "shape": [1]}}'},
            "tensor w: data_offsets must be two non-negative integers",
        ),
        ({"metadata": {"n": 1}}, "__metadata__ must map strings to strings"),
    ],
)
def test_corrupt_safetensors_is_named_precisely(
    tmp_path: Path, kwargs: dict, expected: str
) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", **kwargs)
    problem = _only(validate_file(path))
    assert problem.startswith("bad.safetensors: ")
    assert expected in problem


def test_file_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", {"w": ("F32", (4,))}, extra_bytes=4)
    size = path.stat().st_size
    assert _only(validate_file(path)) == (
        f"m.safetensors: file size mismatch: expected {size - 4}, got {size}"
    )


def test_tiny_file(tmp_path: Path) -> None:
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<I", 3))
    assert "file too small for a safetensors header (4 bytes)" in _only(
        validate_file(tmp_path / "t.safetensors")
    )


def test_missing_shard(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    write_safetensors_model(directory, shards=3)
    (directory / shard_name(2, 3)).unlink()
    assert store.resolve("m") is None
    assert _only(store.validate("m")) == (
        f"missing shard {shard_name(2, 3)} (named in model.safetensors.index.json)"
    )


def test_tensor_named_in_weight_map_missing_from_shard(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    write_safetensors_model(
        directory, shards=2, weight_map_extra={"lm_head.weight": shard_name(2, 2)}
    )
    assert _only(store.validate("m")) == (
        f"tensor lm_head.weight named in weight_map missing from shard {shard_name(2, 2)}"
    )


def test_many_missing_tensors_are_summarised(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    extra = {f"ghost.{i}": shard_name(1, 2) for i in range(9)}
    write_safetensors_model(directory, shards=2, weight_map_extra=extra)
    problems = store.validate("m")
    assert len(problems) == 6
    assert (
        problems[-1] == f"4 more tensors named in weight_map missing from shard {shard_name(1, 2)}"
    )


@pytest.mark.parametrize(
    "shard",
    [
        "../outside.safetensors",
        "/etc/passwd",
        "a/../../x.safetensors",
        "sub\\..\\..\\x.safetensors",
    ],
)
def test_shard_path_escaping_the_model_directory(store: ModelStorage, shard: str) -> None:
    directory = store.models_dir / "m"
    write_safetensors_model(directory, shards=2, weight_map_extra={"evil.weight": shard})
    (store.models_dir / "outside.safetensors").write_bytes(
        (directory / shard_name(1, 2)).read_bytes()
    )
    assert _only(store.validate("m")) == (
        f"model.safetensors.index.json: shard path escapes model directory: {shard}"
    )
    assert store.resolve("m") is None


def test_shards_in_a_subdirectory_are_allowed(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    write_safetensors_model(directory, shards=2)
    (directory / "weights").mkdir()
    (directory / shard_name(2, 2)).rename(directory / "weights" / shard_name(2, 2))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"] = {
        t: (f"weights/{f}" if f == shard_name(2, 2) else f) for t, f in index["weight_map"].items()
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    d = store.resolve("m")
    assert d is not None, store.validate("m")
    assert directory / "weights" / shard_name(2, 2) in d.files


def test_corrupt_shard_is_reported_with_its_name(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    write_safetensors_model(directory, shards=3)
    shard = directory / shard_name(3, 3)
    shard.write_bytes(shard.read_bytes()[:-1])
    assert _only(store.validate("m")).startswith(f"{shard_name(3, 3)}: file size mismatch: ")


@pytest.mark.parametrize(
    "index_text", ["{", "[]", '{"weight_map": {}}', '{"weight_map": {"a": 1}}']
)
def test_broken_index(store: ModelStorage, index_text: str) -> None:
    directory = store.models_dir / "m"
    write_safetensors_model(directory, shards=2)
    (directory / "model.safetensors.index.json").write_text(index_text)
    problems = store.validate("m")
    assert problems and all(p.startswith("model.safetensors.index.json: ") for p in problems)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_companion_files_must_exist_and_parse(store: ModelStorage, name: str) -> None:
    directory = store.models_dir / "m"
    write_safetensors_model(directory)
    (directory / name).unlink()
    assert _only(store.validate("m")) == f"{name} missing"
    (directory / name).write_text('{"a": [1, 2,]}')
    assert _only(store.validate("m")).startswith(f"{name}: invalid JSON at byte ")
    write_config(directory)
    write_tokenizer(directory)
    assert store.validate("m") == []


def test_several_safetensors_without_index(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    write_safetensors_model(directory)
    write_safetensors(directory / "extra.safetensors")
    assert store.validate("m") == []  # model.safetensors is the one a loader opens
    (directory / "model.safetensors").rename(directory / "other.safetensors")
    assert "several .safetensors files and no model.safetensors.index.json" in _only(
        store.validate("m")
    )


def test_validate_file_checks_json_and_index(tmp_path: Path) -> None:
    good = write_config(tmp_path)
    assert validate_file(good) == []
    (tmp_path / "bad.json").write_text('{"unterminated": "x')
    assert "bad.json: invalid JSON at byte" in _only(validate_file(tmp_path / "bad.json"))
    (tmp_path / "m.safetensors.index.json").write_text('{"weight_map": {"t": "../x"}}')
    assert "shard path escapes model directory: ../x" in _only(
        validate_file(tmp_path / "m.safetensors.index.json")
    )
    assert "not found" in _only(validate_file(tmp_path / "nope.safetensors"))
    (tmp_path / "notes.txt").write_text("hi")
    assert "unsupported file type" in _only(validate_file(tmp_path / "notes.txt"))


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ('{"a": "\\u00e9\\ud83d\\ude00", "b": [1, -2.5e3, true, false, null]}', True),
        ('"\\ud83d"', False),  # unpaired surrogate
        ('{"a": 01}', False),
        ('{"a": 1} x', False),
        ('{"a": "tab\there"}', False),
        ("[" * 300 + "]" * 300, False),  # nesting bound
        ('"caf\u00e9"', True),
    ],
)
def test_json_reader_is_strict(tmp_path: Path, text: str, valid: bool) -> None:
    path = tmp_path / "x.json"
    path.write_text(text, encoding="utf-8")
    assert (validate_file(path) == []) is valid
    path.write_bytes(b'"\xff"')
    assert validate_file(path) != []
