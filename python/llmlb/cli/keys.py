"""``llmlb keys create|update|ls|revoke``: manage API keys and their limits through the
router's admin API."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmlb.cli.api_client import client_command, client_from_args, delete_and_say, path_segment

SCOPES = ("api", "node", "admin")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``keys`` subcommand group."""
    parser = subparsers.add_parser("keys", help="create, list and revoke API keys")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    create = client_command(sub, "create", create_key, "create a key and print it (shown once)")
    create.add_argument("--scope", required=True, choices=SCOPES)
    create.add_argument("--name", help="a label for the key")
    _add_limit_arguments(create)

    update = client_command(
        sub, "update", update_key, "change a key's name or limits ('none' removes a limit)"
    )
    update.add_argument("id", help="key id, as `llmlb keys ls` shows it")
    update.add_argument("--name", help="a new label for the key")
    _add_limit_arguments(update)

    client_command(sub, "ls", list_keys, "list keys (never the keys themselves)")
    revoke = client_command(sub, "revoke", revoke_key, "revoke a key by id")
    revoke.add_argument("id", help="key id, as `llmlb keys ls` shows it")


# (flag, body field, kind): kind int, str or list (comma-separated); "none" sends null.
_LIMIT_FLAGS = (
    ("--rpm", "rpm", int, "requests per minute"),
    ("--tpm", "tpm", int, "prompt + completion tokens per minute"),
    ("--max-parallel", "max_parallel", int, "requests in flight at once"),
    ("--budget-tokens", "budget_tokens", int, "tokens per budget period"),
    ("--budget-period", "budget_period", str, "day or month (UTC)"),
    ("--models", "models", list, "allowed model ids or prefixes (ending in / or *), comma list"),
    ("--priority", "priority", str, "high, normal or low"),
    ("--expires-at", "expires_at", str, "RFC 3339 time the key stops working"),
)


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, _field, _kind, text in _LIMIT_FLAGS:
        parser.add_argument(flag, metavar="VALUE", help=f"{text} ('none': no limit)")


def _limit_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags given, as body fields; the router validates the values."""
    body: dict[str, Any] = {}
    for _flag, field, kind, _text in _LIMIT_FLAGS:
        raw = getattr(args, field)
        if raw is None:
            continue
        if raw.lower() == "none":
            body[field] = None
        elif kind is int:
            body[field] = int(raw) if raw.lstrip("-").isdigit() else raw
        elif kind is list:
            body[field] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            body[field] = raw
    return body


def create_key(args: argparse.Namespace) -> int:
    """Print the new key alone on stdout."""
    body: dict[str, Any] = {"scope": args.scope, **_limit_fields(args)}
    if args.name:
        body["name"] = args.name
    created = client_from_args(args).post("/v0/keys", body)
    print(created["key"])
    return 0


def update_key(args: argparse.Namespace) -> int:
    """Change a key; print its limits as they now are."""
    body = _limit_fields(args)
    if args.name is not None:
        body["name"] = args.name
    if not body:
        print("nothing to change: give --name or a limit flag", file=sys.stderr)
        return 2
    key = client_from_args(args).request("PATCH", f"/v0/keys/{path_segment(args.id)}", body)
    print(f"updated {args.id}: {_describe_limits(key) or 'no limits'}")
    return 0


_SHOWN = ("id", "name", "scope", "prefix", "created_at", "key")


def _describe_limits(key: dict[str, Any]) -> str:
    """``rpm=60 models=a,b`` for the limit fields of a key as the API shows it."""
    parts = []
    for field, value in key.items():
        if field in _SHOWN:
            continue
        shown = ",".join(value) if isinstance(value, list) else str(value)
        parts.append(f"{field}={shown}")
    return " ".join(parts)


def list_keys(args: argparse.Namespace) -> int:
    """Print one line per key: id, scope, prefix, created, name, limits."""
    found = client_from_args(args).get("/v0/keys")["keys"]
    rows = [("ID", "SCOPE", "PREFIX", "CREATED", "NAME", "LIMITS")]
    rows += [
        (
            k["id"],
            k["scope"],
            k["prefix"],
            k["created_at"],
            k.get("name") or "",
            _describe_limits(k),
        )
        for k in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[5]
        )
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    """Revoke one key."""
    return delete_and_say(args, f"/v0/keys/{path_segment(args.id)}", f"revoked {args.id}")
