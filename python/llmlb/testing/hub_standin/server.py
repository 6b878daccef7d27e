"""A local Hugging Face hub stand-in: the hub's real HTTP routes over directories on disk.

Production code (``huggingface_hub``, ``hf_transfer``, the node's downloader) runs unchanged
against it through ``HF_ENDPOINT=http://HOST:PORT``.

Usage::

    python -m llmlb.testing.hub_standin --host 127.0.0.1 --port 8999 --root DIR
        [--bandwidth BYTES_PER_S] [--total-bandwidth BYTES_PER_S] [--fault SPEC ...]
        [--log-requests FILE]
        [--require-token TOKEN] [--hash-cache FILE]

Repositories are directories ``DIR/<org>/<name>/``; their files (symlinks followed) are served
as they are. Commit shas are deterministic from the file list and contents; ``main`` and the
commit sha both resolve. Repos are re-scanned on every ``/api/...`` request, so tests may add
repos or files while the stand-in runs; downloads reuse the last scan.

LFS rule: a file is an LFS file when it is >= 10 MiB or its extension is one the hub stores in
LFS by default (``.gguf .safetensors .bin .pt .pth .onnx .h5 .msgpack .model ...``). LFS files
have a sha256 (``lfs`` in the API, ``ETag``/``X-Linked-Etag`` = sha256, ``X-Linked-Size``);
other files only have a git blob id (``ETag``) and no sha256.

Routes:

- ``GET /api/models/{org}/{name}[/revision/{rev}][?blobs=true]``: model info (``sha``,
  ``siblings`` with ``rfilename``, and with ``blobs`` ``size``, ``blobId``, ``lfs``).
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}][?recursive=true&expand=true]``.
- ``POST /api/models/{org}/{name}/paths-info/{rev}`` (form or JSON ``paths``, ``expand``).
- ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}`` with ``Range`` (206 + ``Content-Range``),
  ``X-Repo-Commit``, ``ETag``, ``X-Linked-Size``, ``X-Linked-Etag``; bodies are streamed with
  ``sendfile`` (never loaded into memory).
- ``GET /health``: 200 ``{"status": "ok"}``.

Misses answer 404 with the hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) so ``huggingface_hub`` raises its real exceptions.

Options:

``--bandwidth RATE``     per-connection cap on file bodies, bytes/s; suffixes K, M, G (decimal)
                         and Ki, Mi, Gi (binary), e.g. ``25M`` (emulates a CDN's per-connection
                         limit). Default: uncapped.
``--total-bandwidth RATE``  cap on the file bodies of all connections together, bytes/s (a
                         site's uplink): one token bucket every connection draws from, in
                         turn; combines with ``--bandwidth``. Default: uncapped.
``--fault SPEC``         inject a fault; repeatable; see :mod:`llmlb.testing.hub_standin.faults`
                         (kinds ``drop``, ``status``, ``corrupt``, ``full``, ``delay``,
                         ``fail-first``, ``redirect-ranges``).
``--log-requests FILE``  append one JSON line per finished request: ``ts``, ``method``, ``path``,
                         ``query``, ``range``, ``status``, ``bytes`` (body bytes sent),
                         ``authorization`` (whether an Authorization header came), ``user_agent``,
                         ``repo``, ``file``, ``faults`` (kinds that fired), ``error``.
``--require-token TOK``  answer 401 like the hub for a private repo unless
                         ``Authorization: Bearer TOK`` is sent (``/health`` stays open).
``--hash-cache FILE``    persist file hashes (keyed by inode, size, mtime) across start-ups.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from aiohttp import web

from llmlb.logs import configure_logging
from llmlb.testing.hub_standin import faults as standin_faults
from llmlb.testing.hub_standin.app import HubStandin
from llmlb.testing.hub_standin.faults import FaultPlan

_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmg]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_rate(text: str) -> float:
    """``25M`` -> 25e6 bytes/s (K/M/G decimal, Ki/Mi/Gi binary).

    Raises:
        ValueError: not a positive rate.
    """
    match = _RATE_RE.match(text)
    if not match:
        raise ValueError(f"not a byte rate: {text!r}")
    rate = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if rate <= 0:
        raise ValueError("the rate must be positive")
    return rate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmlb.testing.hub_standin",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\n\n" + standin_faults.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--root", type=Path, required=True, help="directory of <org>/<name>/ repos")
    parser.add_argument(
        "--bandwidth",
        type=parse_rate,
        default=None,
        metavar="RATE",
        help="per-connection cap on file bodies in bytes/s (e.g. 25M)",
    )
    parser.add_argument(
        "--total-bandwidth",
        type=parse_rate,
        default=None,
        metavar="RATE",
        help="cap on the file bodies of all connections together in bytes/s (e.g. 40M)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault (repeatable), e.g. drop:file=*.gguf,after=1000",
    )
    parser.add_argument(
        "--log-requests",
        type=Path,
        default=None,
        metavar="FILE",
        help="append one JSON line per request to FILE",
    )
    parser.add_argument(
        "--require-token",
        default=None,
        metavar="TOKEN",
        help="answer 401 unless 'Authorization: Bearer TOKEN' is sent",
    )
    parser.add_argument(
        "--hash-cache",
        type=Path,
        default=None,
        metavar="FILE",
        help="persist file hashes across start-ups in FILE",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in until SIGINT/SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        faults = FaultPlan.parse(args.fault)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a directory")
    configure_logging()
    standin = HubStandin(
        args.root.resolve(),
        bandwidth=args.bandwidth,
        total_bandwidth=args.total_bandwidth,
        faults=faults,
        log_path=args.log_requests,
        require_token=args.require_token,
        hash_cache=args.hash_cache,
    )
    print(f"hub stand-in serving {args.root} on http://{args.host}:{args.port}", flush=True)
    web.run_app(
        standin.app(),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=False,
        shutdown_timeout=0.25,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
