"""Entry point of the ``llmlb`` console script: one subcommand module per concern."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes ``register(subparsers)``, adding its subcommand(s) with
# ``set_defaults(func=...)``; ``func(args) -> int`` is the exit code.
SUBCOMMAND_MODULES = (
    "llmlb.cli.storage",
    "llmlb.cli.router",
    "llmlb.cli.node",
    "llmlb.cli.keys",
    "llmlb.cli.usage",
    "llmlb.cli.audit",
    "llmlb.cli.models",
    "llmlb.cli.chat",
    "llmlb.cli.up",
)
# Which module defines each top-level command, so a run imports only the one it needs
# (start-up time of `llmlb node`/`llmlb router` matters; `--help` still lists them all).
COMMAND_MODULES = {
    "storage": "llmlb.cli.storage",
    "router": "llmlb.cli.router",
    "node": "llmlb.cli.node",
    "keys": "llmlb.cli.keys",
    "usage": "llmlb.cli.usage",
    "audit": "llmlb.cli.audit",
    "models": "llmlb.cli.models",
    "nodes": "llmlb.cli.models",
    "pull": "llmlb.cli.models",
    "chat": "llmlb.cli.chat",
    "up": "llmlb.cli.up",
}


class _VersionAction(argparse.Action):
    """``--version``, reading the installed version only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        from llmlb import __version__

        print(f"llmlb {__version__}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the argument parser: every subcommand, or only ``command``'s module when known."""
    parser = argparse.ArgumentParser(
        prog="llmlb",
        description="An OpenAI-compatible load balancer over a fleet of llama.cpp nodes. "
        "Start with `llmlb up`.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMAND_MODULES.get(command or "")
    for name in (wanted,) if wanted else SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
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
