"""The floor: a bare ``llama_cpp.Llama(path)`` load plus one streamed token, in a fresh process.

Usage: ``python bench/coldstart/floor.py PATH [--n-ctx N] [--prefetch] [--evict]``

Prints one JSON line: ``load_s`` (``Llama(...)``), ``token_s`` (first streamed token after
the load), ``total_s`` (both, plus ``prefetch_s`` when asked), ``resident`` (page-cache share
of the file right before loading), ``cpu_s`` / ``cpu_load_s`` (process CPU time, all threads,
for the whole / the load: less sensitive than wall time to other load on the machine).
The clock starts after ``import llama_cpp``, which the node has done before the request
arrives.

Loader settings are llama.cpp's defaults (``Llama(path)``, extra buffer types on), as in the
node (``llmlb.node.inference.engine`` keeps ``extra_buffer_types=True``); only ``n_ctx``
may be set, to compare at the node's context size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson


def main(argv: list[str] | None = None) -> int:
    """Load, generate one token, print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument(
        "--n-ctx", type=int, default=None, help="context length (default: Llama's own, 512)"
    )
    parser.add_argument(
        "--prefetch",
        action="store_true",
        help="call llmlb.model_storage.prefetch_files before loading",
    )
    parser.add_argument(
        "--evict", action="store_true", help="drop the file from the page cache first"
    )
    parser.add_argument("--prompt", default="Hello")
    args = parser.parse_args(argv)

    import llama_cpp

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.coldstart.common import evict, resident_fraction

    if args.evict:
        evict([args.path])
    resident = resident_fraction(args.path)
    kwargs = {"verbose": False}
    if args.n_ctx:
        kwargs["n_ctx"] = args.n_ctx
    cpu_started = time.process_time()
    started = time.monotonic()
    prefetch_s = 0.0
    if args.prefetch:
        from llmlb.model_storage import prefetch_files

        prefetch_files([args.path])
        prefetch_s = time.monotonic() - started
    llm = llama_cpp.Llama(str(args.path), **kwargs)
    loaded = time.monotonic()
    cpu_loaded = time.process_time()
    stream = llm.create_completion(args.prompt, max_tokens=1, stream=True, temperature=0)
    for _chunk in stream:
        break
    done = time.monotonic()
    cpu_done = time.process_time()
    print(
        orjson.dumps(
            {
                "load_s": loaded - started - prefetch_s,
                "token_s": done - loaded,
                "prefetch_s": prefetch_s,
                "total_s": done - started,
                "resident": resident,
                "cpu_s": cpu_done - cpu_started,
                "cpu_load_s": cpu_loaded - cpu_started,
            }
        ).decode(),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
