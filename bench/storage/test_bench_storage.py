"""Native model store vs the pure-Python reference (bench/storage/reference.py).

Run: .venv/bin/python -m pytest bench/storage -p no:cacheprovider --benchmark-group-by=group
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from llmlb.model_storage import ModelStorage

from bench.storage.reference import ReferenceStorage

BIG = "big/sharded-512"
IMPLS = {
    "native": ModelStorage,
    "native-1-thread": lambda root: ModelStorage(root, threads=1),
    "python": ReferenceStorage,
}


@pytest.fixture(params=list(IMPLS))
def impl(request: pytest.FixtureRequest) -> tuple[str, Callable]:
    return request.param, IMPLS[request.param]


def test_implementations_agree(bench_store: tuple[Path, int], big_store: Path) -> None:
    root, valid = bench_store
    native = ModelStorage(root).list_available()
    assert len(native) == valid
    assert ReferenceStorage(root).list_available() == native
    assert ModelStorage(big_store).validate(BIG) == ReferenceStorage(big_store).validate(BIG) == []
    assert ModelStorage(big_store).resolve(BIG).size_bytes == (  # type: ignore[union-attr]
        ReferenceStorage(big_store).resolve(BIG).size_bytes
    )  # type: ignore[union-attr]


@pytest.mark.benchmark(group="list_available: 1,000-model store")
def test_list_available(benchmark, impl, bench_store: tuple[Path, int]) -> None:
    root, valid = bench_store
    store = impl[1](root)
    result = benchmark.pedantic(store.list_available, rounds=5, warmup_rounds=1)
    assert len(result) == valid


@pytest.mark.benchmark(group="validate: 512-shard safetensors")
def test_validate_512_shards(benchmark, impl, big_store: Path) -> None:
    store = impl[1](big_store)
    assert benchmark.pedantic(store.validate, args=(BIG,), rounds=10, warmup_rounds=1) == []


@pytest.mark.benchmark(group="resolve: 512-shard safetensors")
def test_resolve_512_shards(benchmark, impl, big_store: Path) -> None:
    store = impl[1](big_store)
    d = benchmark.pedantic(store.resolve, args=(BIG,), rounds=10, warmup_rounds=1)
    assert d is not None and len(d.files) == 512 + 3


@pytest.mark.benchmark(group="resolve: one GGUF model")
def test_resolve_gguf(benchmark, impl, bench_store: tuple[Path, int]) -> None:
    store = impl[1](bench_store[0])
    d = benchmark.pedantic(store.resolve, args=("org-00/model-0000",), rounds=50, warmup_rounds=2)
    assert d is not None and d.format == "gguf"


def _best_of(fn: Callable[[], object], rounds: int = 15) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def test_native_validation_is_at_least_5x_faster(big_store: Path) -> None:
    native = ModelStorage(big_store, threads=1)  # single-threaded: no help from parallelism
    python = ReferenceStorage(big_store)
    native.validate(BIG)
    python.validate(BIG)
    t_native = _best_of(lambda: native.validate(BIG))
    t_python = _best_of(lambda: python.validate(BIG))
    print(
        f"\nvalidate {BIG}: native(1 thread) {t_native * 1e3:.1f} ms, "
        f"python {t_python * 1e3:.1f} ms, ratio {t_python / t_native:.1f}x"
    )
    assert t_python / t_native >= 5
