"""Generated stores for the storage benchmarks (built once per session under a temp dir)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.factories import (
    make_store_model,
    write_gguf,
    write_safetensors_model,
    write_split_gguf,
)

STORE_MODELS = 1_000
BIG_SHARDS = 512
BIG_TENSORS_PER_SHARD = 64
VOCAB = [f"tok{i}" for i in range(1_000)]  # a small tokenizer vocabulary in every GGUF
QUANTS = ("Q4_K_M", "Q8_0", "Q5_K_M", "Q6_K", "F16")


def build_store(root: Path) -> int:
    """Write 1,000 models of every layout (2% of them corrupt); returns the valid count."""
    valid = 0
    for i in range(STORE_MODELS):
        model_id = f"org-{i % 25:02d}/model-{i:04d}"
        directory = root / model_id
        kind = i % 10
        quant = QUANTS[i % len(QUANTS)]
        corrupt = i % 50 == 49
        if kind <= 5:
            write_gguf(
                directory / f"model-{i:04d}-{quant}.gguf",
                file_type=quant,
                extra_kv={"tokenizer.ggml.tokens": VOCAB},
                truncate=corrupt,
            )
        elif kind == 6:
            write_split_gguf(
                directory, f"model-{quant}", 3, file_type=quant, skip=[2] if corrupt else []
            )
        elif kind in (7, 8):
            write_safetensors_model(directory, tensors_per_shard=8, tokenizer=not corrupt)
        else:
            write_safetensors_model(directory, shards=4, tensors_per_shard=8)
            if corrupt:
                (directory / "model-00004-of-00004.safetensors").unlink()
        valid += not corrupt
    make_store_model(root / ".staging", "org-00/in-flight")
    return valid


@pytest.fixture(scope="session")
def bench_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """(root, number of valid models) of the 1,000-model store."""
    root = tmp_path_factory.mktemp("store")
    started = time.perf_counter()
    valid = build_store(root)
    print(f"\nbuilt 1,000-model store in {time.perf_counter() - started:.1f}s")
    return root, valid


@pytest.fixture(scope="session")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding ``big/sharded-512``: 512 safetensors shards x 64 tensors, with index."""
    root = tmp_path_factory.mktemp("big")
    write_safetensors_model(
        root / "big" / "sharded-512", shards=BIG_SHARDS, tensors_per_shard=BIG_TENSORS_PER_SHARD
    )
    return root
