"""What the two serving commands, ``llmlb router`` and ``llmlb node``, share: the address
they bind."""

from __future__ import annotations

import argparse


def add_bind_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """Add ``--host`` (default ``127.0.0.1``) and ``--port`` (default ``port``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=port, help=f"port to bind ({port})")
