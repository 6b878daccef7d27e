"""The ``llmlb`` entry point: version, help and per-command module loading."""

from __future__ import annotations

import subprocess
import sys

import pytest
from llmlb.cli.main import COMMAND_MODULES, SUBCOMMAND_MODULES, build_parser, main

from tests.procs import LLMLB
from tests.router_fixtures import free_url


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = subprocess.run([*LLMLB, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"llmlb {version('llmlb')}"


def test_help_lists_every_command():
    result = subprocess.run([*LLMLB, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in COMMAND_MODULES:
        assert f"    {command} " in result.stdout, command


def test_every_command_maps_to_a_module_that_defines_it():
    assert set(COMMAND_MODULES.values()) == set(SUBCOMMAND_MODULES)
    for command, module in COMMAND_MODULES.items():
        parser = build_parser(command)
        args = parser.parse_args([command, *_minimal(command)])
        assert args.command == command, module


def _minimal(command: str) -> list[str]:
    """The fewest arguments each command parses with."""
    return {
        "storage": ["ls"],
        "keys": ["ls"],
        "audit": ["verify"],
        "models": ["ls"],
        "nodes": ["ls"],
        "pull": ["some/model"],
        "chat": ["some/model", "hi"],
    }.get(command, [])


def test_a_command_imports_only_its_own_module():
    code = (
        "import sys; from llmlb.cli.main import build_parser; build_parser('storage'); "
        "print(sorted(m for m in sys.modules if m.startswith('llmlb.cli.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    loaded = result.stdout.strip()
    assert "llmlb.cli.storage" in loaded
    assert "llmlb.cli.up" not in loaded and "llmlb.cli.models" not in loaded


ROUTER_COMMANDS = [
    ["keys", "ls"],
    ["keys", "create", "--scope", "api"],
    ["keys", "update", "key-1", "--rpm", "60"],
    ["keys", "revoke", "key-1"],
    ["audit", "ls"],
    ["audit", "verify"],
    ["models", "register", "org/name"],
    ["models", "ls"],
    ["models", "rm", "org/name"],
    ["nodes", "ls"],
    ["nodes", "approve", "node-1"],
    ["nodes", "revoke", "node-1"],
]


@pytest.mark.parametrize("argv", ROUTER_COMMANDS, ids=" ".join)
def test_a_router_command_reports_an_unreachable_router_in_one_line(argv, capsys):
    code = main([*argv, "--router", free_url(), "--api-key", "sk-test"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith("error: ") and "cannot reach the router" in err
    assert len(err.strip().splitlines()) == 1
