"""Entry point of the ``llmlb`` console script: one subcommand module per concern."""

from __future__ import annotations

import argparse
import importlib
import sys

from llmlb import __version__

# Each module exposes ``register(subparsers)``, adding its subcommand(s) with
# ``set_defaults(func=...)``; ``func(args) -> int`` is the exit code.
SUBCOMMAND_MODULES = (
    "llmlb.cli.storage",
    "llmlb.cli.router",
    "llmlb.cli.node",
    "llmlb.cli.keys",
    "llmlb.cli.models",
    "llmlb.cli.up",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser."""
    parser = argparse.ArgumentParser(prog="llmlb", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llmlb {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # subcommand not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
