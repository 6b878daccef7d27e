"""Start ``llmlb node`` exactly as the CLI does, optionally with the store's prefetch disabled.

Usage: ``python bench/coldstart/node_launch.py [--no-prefetch] node --router ... ``

With ``--no-prefetch`` the Granian worker builds the node's app through
:func:`app_without_prefetch`, which replaces ``ModelStorage.prefetch`` on the node's store
with a no-op; everything else is the unchanged production code path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NO_PREFETCH_ENV = "LLMLB_BENCH_NO_PREFETCH"


def app_without_prefetch():  # noqa: ANN201 - a Starlette app
    """Granian factory: the node's app with prefetch turned into a no-op."""
    from llmlb.node.api.app import app_from_env

    app = app_from_env()
    app.state.node.store.prefetch = lambda _model_id: 0
    return app


def main(argv: list[str]) -> int:
    """Run the CLI with ``argv`` (``--no-prefetch`` first swaps the app factory)."""
    repo_root = str(Path(__file__).resolve().parents[2])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    import llmlb.cli.node as cli_node
    from llmlb.cli.main import main as cli_main

    if argv and argv[0] == "--no-prefetch":
        argv = argv[1:]
        os.environ[NO_PREFETCH_ENV] = "1"
        cli_node.APP_FACTORY = "bench.coldstart.node_launch:app_without_prefetch"
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
