"""Build llama.cpp's ``llama-server`` from the llama.cpp the installed llama-cpp-python vendors.

The benchmark compares the node's engine with llama.cpp's own server on the *same* llama.cpp
revision and build flags, so the binary is built from the sdist of the installed
llama-cpp-python version (fetched with pip from the package index), with ``GGML_NATIVE=OFF``
like the README's install command. The result is cached under ``bench/engine/.cache/`` and
reused when present. Not part of the install.

Usage: ``.venv/bin/python bench/engine/build_server.py [--jobs 2] [--sdist-dir DIR]``; prints
the binary's path.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

# LLAMA_CURL is gone in recent llama.cpp (LLAMA_OPENSSL replaced it); passing both is harmless.
# The UI flags keep the build offline (no prebuilt web UI fetched from the hub).
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]


def installed_version() -> str:
    """The version of the llama-cpp-python installed in this interpreter."""
    return importlib.metadata.version("llama_cpp_python")


def binary_path(version: str) -> Path:
    """Where the cached ``llama-server`` for ``version`` lives."""
    return CACHE / f"llama-server-{version}" / "llama-server"


def fetch_sdist(version: str, dest: Path) -> Path:
    """Download and extract the sdist of ``llama-cpp-python==version``; returns its root."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps",
         "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(dest)],
        check=True,
    )
    archives = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz")) or sorted(
        dest.glob("llama*cpp*python*.tar.gz"))
    if not archives:
        raise SystemExit(f"pip download left no sdist in {dest}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(dest, filter="data")
    roots = [p for p in dest.iterdir() if p.is_dir() and (p / "vendor" / "llama.cpp").is_dir()]
    if not roots:
        raise SystemExit(f"the sdist in {dest} has no vendor/llama.cpp")
    return roots[0]


def build(source: Path, out: Path, jobs: int) -> None:
    """Configure and build the ``llama-server`` target of ``source``; copy it to ``out``."""
    build_dir = out.parent / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS], check=True)
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)],
        check=True,
    )
    built = next(build_dir.rglob("bin/llama-server"), None)
    if built is None:
        raise SystemExit(f"no llama-server under {build_dir}")
    shutil.copy2(built, out)
    shutil.rmtree(build_dir, ignore_errors=True)  # ~100 MB of objects; the binary is static


def ensure_server(jobs: int = 2, sdist_dir: Path | None = None) -> Path:
    """Return the cached ``llama-server`` for the installed version, building it if missing.

    ``sdist_dir`` reuses an already extracted sdist (a directory with ``vendor/llama.cpp``)
    instead of downloading one.
    """
    version = installed_version()
    out = binary_path(version)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if sdist_dir is not None:
        build(sdist_dir / "vendor" / "llama.cpp", out, jobs)
        return out
    with tempfile.TemporaryDirectory(prefix="lcp-sdist-") as tmp:
        root = fetch_sdist(version, Path(tmp))
        build(root / "vendor" / "llama.cpp", out, jobs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    parser.add_argument("--sdist-dir", type=Path, default=None,
                        help="an extracted llama-cpp-python sdist to build from (skips pip)")
    args = parser.parse_args()
    print(ensure_server(args.jobs, args.sdist_dir))


if __name__ == "__main__":
    main()
