"""The store as a whole: listing, selection among variants, deletion, prefetch, GIL release."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from llmlb.model_storage import InvalidModelId, ModelStorage, prefetch_files, validate_file

from tests.factories import (
    make_store_model,
    write_gguf,
    write_gguf_model,
    write_safetensors_model,
    write_split_gguf,
)


@pytest.fixture
def store(tmp_path: Path) -> ModelStorage:
    return ModelStorage(tmp_path / "models")


def test_missing_store_is_empty(store: ModelStorage) -> None:
    assert not store.models_dir.exists()
    assert store.list_available() == []
    assert store.resolve("anything") is None
    assert store.validate("anything") == [f"model directory not found: {store.models_dir}/anything"]
    assert store.detect_format("anything") == "unknown"
    assert store.delete_model("anything") is False
    assert store.prefetch("anything") == 0


def test_list_available_is_recursive_sorted_and_complete_only(store: ModelStorage) -> None:
    root = store.models_dir
    make_store_model(root, "openai/gpt-oss-20b")
    make_store_model(root, "gemma", "split")
    make_store_model(root, "org/sub/deep", "safetensors")
    make_store_model(root, "org/sharded", "sharded")
    write_gguf_model(root, "broken", truncate=True)  # invalid: not listed
    write_safetensors_model(root / "no-tokenizer", tokenizer=False)  # incomplete
    make_store_model(root / ".staging", "openai/partial")  # staging area is skipped
    make_store_model(root / ".cache", "hidden")
    make_store_model(root, "Upper/Case")  # not addressable by a normalised id
    # A model's subdirectory not addressable by an id is part of the model.
    make_store_model(root, "openai/gpt-oss-20b/Original")
    (root / "empty" / "dirs").mkdir(parents=True)
    assert store.list_available() == ["gemma", "openai/gpt-oss-20b", "org/sharded", "org/sub/deep"]


def test_list_available_follows_symlinked_models(store: ModelStorage, tmp_path: Path) -> None:
    elsewhere = make_store_model(tmp_path / "elsewhere", "real")
    (store.models_dir / "org").mkdir(parents=True)
    (store.models_dir / "org" / "linked").symlink_to(elsewhere)
    (store.models_dir / "org" / "loop").symlink_to(store.models_dir)
    assert store.list_available() == ["org/linked"]


def test_several_gguf_need_a_quant_choice(store: ModelStorage) -> None:
    directory = store.models_dir / "llama"
    q4 = write_gguf(directory / "Llama-3.2-1B-Q4_K_M.gguf", file_type="Q4_K_M")
    q8 = write_gguf(directory / "Llama-3.2-1B-Q8_0.gguf", file_type="Q8_0")
    assert store.resolve("llama") is None
    problem = store.validate("llama")[0]
    assert "several GGUF files and no ':QUANT' suffix" in problem
    assert "Llama-3.2-1B-Q4_K_M.gguf (:q4_k_m)" in problem
    d4 = store.resolve("llama:Q4_K_M")
    d8 = store.resolve("LLAMA:q8_0")
    assert d4 is not None and d4.primary_path == q4 and d4.id == "llama:q4_k_m"
    assert d8 is not None and d8.primary_path == q8 and d8.quantization == "Q8_0"
    assert store.validate("llama:q5_k_m") == [
        "no GGUF file matches quantization 'q5_k_m' (found: Llama-3.2-1B-Q4_K_M.gguf (:q4_k_m), "
        "Llama-3.2-1B-Q8_0.gguf (:q8_0))"
    ]
    assert store.list_available() == ["llama:q4_k_m", "llama:q8_0"]


def test_quant_matches_the_header_when_the_name_does_not(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    a = write_gguf(directory / "first.gguf", file_type="Q6_K")
    write_gguf(directory / "second.gguf", file_type="F16")
    d = store.resolve("m:q6_k")
    assert d is not None and d.primary_path == a
    assert store.list_available() == ["m:f16", "m:q6_k"]


def test_ambiguous_quant_match(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    write_gguf(directory / "m-Q4_K_M.gguf")
    write_gguf(directory / "m-imatrix.Q4_K_M.gguf")
    assert store.validate("m:q4_k_m") == [
        "several GGUF files match quantization 'q4_k_m': m-Q4_K_M.gguf, m-imatrix.Q4_K_M.gguf"
    ]


def test_quant_selects_a_split_set(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    write_split_gguf(directory, "m-Q8_0", 2, file_type="Q8_0")
    single = write_gguf(directory / "m-Q4_K_M.gguf")
    d = store.resolve("m:q8_0")
    assert d is not None and len(d.files) == 2 and d.quantization == "Q8_0"
    assert store.resolve("m:q4_k_m").primary_path == single  # type: ignore[union-attr]


def test_gguf_beside_safetensors_needs_a_choice(store: ModelStorage) -> None:
    directory = store.models_dir / "mixed"
    write_safetensors_model(directory)
    gguf = write_gguf(directory / "mixed-Q4_K_M.gguf")
    assert store.resolve("mixed") is None
    assert (
        "both GGUF (mixed-Q4_K_M.gguf) and safetensors files present" in store.validate("mixed")[0]
    )
    assert store.detect_format("mixed") == "unknown"
    assert store.detect_format("mixed:q4_k_m") == "gguf"
    d = store.resolve("mixed:q4_k_m")
    assert d is not None and d.format == "gguf" and d.primary_path == gguf
    assert store.list_available() == ["mixed:q4_k_m"]
    write_safetensors_model(store.models_dir / "st")
    assert store.validate("st:q4_k_m") == [
        "quantization ':q4_k_m' selects a GGUF file but the model has none"
    ]


def test_metal_and_auxiliary_files(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    directory.mkdir(parents=True)
    (directory / "model.metal.bin").write_bytes(b"\0" * 64)
    assert store.detect_format("m") == "metal"
    d = store.resolve("m")
    assert d is not None and d.format == "metal" and d.size_bytes == 64
    gguf = write_gguf(directory / "m.gguf")
    mmproj = write_gguf(directory / "mmproj-m-f16.gguf", file_type="F16")
    d = store.resolve("m")
    assert d is not None and d.format == "gguf" and d.primary_path == gguf
    assert set(d.files) == {gguf, mmproj, directory / "model.metal.bin"}
    (directory / "model.metal.bin").write_bytes(b"")
    gguf.unlink()
    mmproj.unlink()
    assert store.validate("m") == ["model.metal.bin is empty"]


def test_delete_is_idempotent_and_prunes_empty_parents(store: ModelStorage) -> None:
    root = store.models_dir
    make_store_model(root, "org/team/a")
    make_store_model(root, "org/b")
    assert store.delete_model("ORG/team/a") is True
    assert not (root / "org" / "team").exists()  # emptied parent removed
    assert (root / "org" / "b").is_dir()  # sibling kept
    assert store.delete_model("org/team/a") is False
    assert store.delete_model("org/b") is True
    assert not (root / "org").exists()
    assert root.is_dir()  # the store root itself always stays
    assert store.list_available() == []


def test_delete_refuses_a_namespace_and_bad_ids(store: ModelStorage) -> None:
    make_store_model(store.models_dir, "org/a")
    assert store.delete_model("org") is False
    assert store.list_available() == ["org/a"]
    for bad in ("..", "../x", "/", "a//b"):
        with pytest.raises(InvalidModelId):
            store.delete_model(bad)


def test_nested_models_conflict_and_neither_is_listed(store: ModelStorage) -> None:
    root = store.models_dir
    make_store_model(root, "nest")
    make_store_model(root, "nest/inner", "safetensors")
    make_store_model(root, "deep")
    make_store_model(root, "deep/a/b/c", "split")
    make_store_model(root, "free/model")
    assert store.list_available() == ["free/model"]
    assert store.conflicting_model("nest") == "nest/inner"
    assert store.conflicting_model("nest/inner") == "nest"
    assert store.conflicting_model("nest/inner/x:q4") == "nest"
    assert store.conflicting_model("deep/a") == "deep"
    assert store.conflicting_model("deep") == "deep/a/b/c"
    assert store.conflicting_model("free/model") is None
    assert store.conflicting_model("free") == "free/model"  # a namespace would swallow it
    assert store.conflicting_model("absent/model") is None
    for model_id in ("nest", "nest/inner", "deep", "deep/a/b/c"):
        assert store.resolve(model_id) is None
        (problem,) = store.validate(model_id)
        assert "model id conflict" in problem, problem


def test_delete_never_removes_a_model_nested_inside(store: ModelStorage) -> None:
    root = store.models_dir
    outer = make_store_model(root, "nest")
    inner = make_store_model(root, "nest/inner", "safetensors")
    deeper = make_store_model(root, "nest/ns/deeper")
    (outer / "notes").mkdir()  # a plain subdirectory belongs to the model
    (outer / "notes" / "a.txt").write_text("x")
    inner_files = sorted(p.relative_to(root) for p in inner.rglob("*"))
    assert store.delete_model("nest") is True
    assert not list(outer.glob("*.gguf")) and not (outer / "notes").exists()
    assert sorted(p.relative_to(root) for p in inner.rglob("*")) == inner_files
    assert list(deeper.glob("*.gguf"))
    assert store.list_available() == ["nest/inner", "nest/ns/deeper"]
    assert store.delete_model("nest") is False  # only other models' directories are left


def test_delete_one_quant_variant(store: ModelStorage) -> None:
    directory = store.models_dir / "m"
    write_gguf(directory / "m-Q4_K_M.gguf")
    write_split_gguf(directory, "m-Q8_0", 2, file_type="Q8_0")
    assert store.delete_model("m:q8_0") is True
    assert sorted(p.name for p in directory.iterdir()) == ["m-Q4_K_M.gguf"]
    assert store.list_available() == ["m"]
    assert store.delete_model("m:q8_0") is False
    assert store.delete_model("m:q4_k_m") is True
    assert not directory.exists()


def test_delete_never_leaves_models_dir(store: ModelStorage, tmp_path: Path) -> None:
    outside = make_store_model(tmp_path / "outside", "victim")
    store.models_dir.mkdir()
    (store.models_dir / "org").symlink_to(outside.parent)
    with pytest.raises(RuntimeError, match="outside the models directory"):
        store.delete_model("org/victim")
    assert (outside / "victim-Q4_K_M.gguf").exists()
    # A symlinked model is unlinked, its target left alone.
    (store.models_dir / "link").symlink_to(outside)
    assert store.delete_model("link") is True
    assert not (store.models_dir / "link").exists() and outside.is_dir()


def test_prefetch_schedules_every_file(store: ModelStorage) -> None:
    directory = make_store_model(store.models_dir, "m", "sharded")
    d = store.resolve("m")
    assert d is not None
    expected = sum(p.stat().st_size for p in d.files)
    assert store.prefetch("m") == expected == d.size_bytes
    assert prefetch_files(list(directory.iterdir())) == expected
    assert prefetch_files([directory / "missing"]) == 0
    write_gguf_model(store.models_dir, "cut", truncate=True)
    assert store.prefetch("cut") == 0


def test_prefetch_of_a_large_file_returns_its_size(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(300 << 20)  # sparse: several readahead chunks, no real I/O
    assert prefetch_files([big, big]) == 2 * (300 << 20)


def test_native_calls_release_the_gil(tmp_path: Path) -> None:
    """While long native calls run in a thread, Python code keeps running in another."""
    big = tmp_path / "big.json"
    big.write_text("[" + "1234567890," * 6_000_000 + "0]")
    durations = []
    for _ in range(2):
        started = time.perf_counter()
        assert validate_file(big) == []
        durations.append(time.perf_counter() - started)
    duration = min(durations)
    assert duration > 0.02

    done = threading.Event()

    def work() -> None:
        for _ in range(4):
            validate_file(big)
        done.set()

    worker = threading.Thread(target=work)
    gaps = []
    started = last = time.perf_counter()
    worker.start()
    while not done.is_set():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    elapsed = time.perf_counter() - started
    worker.join()
    # Holding the GIL would stall this loop for one whole call per call, i.e. for nearly all
    # of `elapsed`; released, only scheduling noise on a busy machine shows up.
    stalled = sum(g for g in gaps if g > duration / 2)
    assert stalled < elapsed / 2, (stalled, elapsed, duration)


def test_store_accepts_str_and_relative_paths(tmp_path: Path) -> None:
    make_store_model(tmp_path / "models", "m")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        store = ModelStorage("models")
        assert store.models_dir == tmp_path / "models"
        assert store.list_available() == ["m"]
    finally:
        os.chdir(cwd)
