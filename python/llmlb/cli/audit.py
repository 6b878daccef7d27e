"""``llmlb audit ls|verify``: read the router's audit log of admin actions and check its hash
chain (a removed, inserted or altered row is reported; the exit code is 1 then)."""

from __future__ import annotations

import argparse
from typing import Any

from llmlb.cli.api_client import ApiClient, client_command, client_from_args
from llmlb.router.control.audit import MAX_PAGE, verify


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` subcommand group."""
    parser = subparsers.add_parser("audit", help="the audit log of admin actions")
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    client_command(sub, "ls", list_entries, "list the entries, oldest first")
    client_command(sub, "verify", verify_log, "check the hash chain of the whole log")


def _fetch_all(client: ApiClient) -> tuple[list[dict[str, Any]], int]:
    entries: list[dict[str, Any]] = []
    count = 0
    after = 0
    while True:
        page = client.get(f"/v0/audit?after={after}&limit={MAX_PAGE}")
        count = page["count"]
        entries += page["entries"]
        if len(page["entries"]) < MAX_PAGE:
            return entries, count
        after = page["entries"][-1]["seq"]


def list_entries(args: argparse.Namespace) -> int:
    """Print one line per entry: seq, time, actor, action, target."""
    entries, _ = _fetch_all(client_from_args(args))
    for entry in entries:
        print(
            f"{entry['seq']:>6}  {entry['at']}  {entry['actor'] or '-':<22}  "
            f"{entry['action']:<17}  {entry['target']}"
        )
    return 0


def verify_log(args: argparse.Namespace) -> int:
    """Print ``ok`` and the number of entries, or each problem found (exit 1)."""
    entries, count = _fetch_all(client_from_args(args))
    problems = verify(entries, count)
    if problems:
        for problem in problems:
            print(f"tampered: {problem}")
        return 1
    print(f"ok: {len(entries)} entries, the chain holds")
    return 0
