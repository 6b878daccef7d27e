"""``llmlb keys create|ls|revoke``: manage API keys through the router's admin API."""

from __future__ import annotations

import argparse

from llmlb.cli.api_client import (
    ApiClientError,
    add_client_arguments,
    client_from_args,
    path_segment,
    report_error,
)

SCOPES = ("api", "node", "admin")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``keys`` subcommand group."""
    parser = subparsers.add_parser("keys", help="create, list and revoke API keys")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    create = sub.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--scope", required=True, choices=SCOPES)
    create.add_argument("--name", help="a label for the key")
    add_client_arguments(create)
    create.set_defaults(func=create_key)

    ls = sub.add_parser("ls", help="list keys (never the keys themselves)")
    add_client_arguments(ls)
    ls.set_defaults(func=list_keys)

    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", help="key id, as `llmlb keys ls` shows it")
    add_client_arguments(revoke)
    revoke.set_defaults(func=revoke_key)


def create_key(args: argparse.Namespace) -> int:
    """Print the new key alone on stdout."""
    body = {"scope": args.scope}
    if args.name:
        body["name"] = args.name
    try:
        created = client_from_args(args).post("/v0/keys", body)
    except ApiClientError as exc:
        return report_error(exc)
    print(created["key"])
    return 0


def list_keys(args: argparse.Namespace) -> int:
    """Print one line per key: id, scope, prefix, created, name."""
    try:
        found = client_from_args(args).get("/v0/keys")["keys"]
    except ApiClientError as exc:
        return report_error(exc)
    rows = [("ID", "SCOPE", "PREFIX", "CREATED", "NAME")]
    rows += [
        (k["id"], k["scope"], k["prefix"], k["created_at"], k.get("name") or "") for k in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[4]
        )
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    """Revoke one key."""
    try:
        client_from_args(args).delete(f"/v0/keys/{path_segment(args.id)}")
    except ApiClientError as exc:
        return report_error(exc)
    print(f"revoked {args.id}")
    return 0
