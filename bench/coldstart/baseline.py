"""What a user would otherwise do: ``huggingface_hub.snapshot_download`` plus the same load.

Usage: ``python bench/coldstart/baseline.py ENDPOINT REPO CACHE_DIR [--load gguf|none]``

Prints one JSON line: ``download_s`` (``snapshot_download`` into an empty cache), ``load_s``
(``llama_cpp.Llama`` with the node's arguments for a GGUF; 0 for ``--load none``) and
``total_s``. The clock starts after the imports, in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import orjson


def main(argv: list[str] | None = None) -> int:
    """Download, load, print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("endpoint")
    parser.add_argument("repo")
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--load", choices=("gguf", "none"), default="gguf")
    parser.add_argument("--n-ctx", type=int, default=4096)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    from huggingface_hub import snapshot_download

    llama_cpp = None
    if args.load == "gguf":
        import llama_cpp  # llama.cpp's default loader settings, as in the node
    started = time.monotonic()
    local = Path(
        snapshot_download(args.repo, cache_dir=args.cache_dir, endpoint=args.endpoint, token=False)
    )
    downloaded = time.monotonic()
    if llama_cpp is not None:
        (gguf,) = sorted(local.rglob("*.gguf"))
        gpu = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        llama_cpp.Llama(str(gguf), n_ctx=args.n_ctx, n_gpu_layers=gpu, use_mmap=True, verbose=False)
    done = time.monotonic()
    print(
        orjson.dumps(
            {
                "download_s": downloaded - started,
                "load_s": done - downloaded,
                "total_s": done - started,
            }
        ).decode(),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
