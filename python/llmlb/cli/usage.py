"""``llmlb usage``: requests and tokens per key and model (or node, minute, hour, day), read
from the router's ``GET /v0/usage`` (admin) or ``/v0/usage/self`` (``--self``: any key)."""

from __future__ import annotations

import argparse
import csv
import sys
from urllib.parse import urlencode

from llmlb.cli.api_client import (
    ApiClientError,
    add_client_arguments,
    client_from_args,
    report_error,
)

COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens",
            "errors")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``usage`` subcommand."""
    parser = subparsers.add_parser("usage", help="requests and tokens per key, model, node, time")
    parser.add_argument("--key", help="only this key id")
    parser.add_argument("--model", help="only this model id")
    parser.add_argument("--from", dest="start", help="RFC 3339 time or unix seconds (24 h ago)")
    parser.add_argument("--to", dest="end", help="RFC 3339 time or unix seconds (now)")
    parser.add_argument(
        "--group-by", default="key,model", help="of key, model, node, minute, hour, day"
    )
    parser.add_argument("--csv", action="store_true", help="CSV instead of a table")
    parser.add_argument(
        "--self", dest="own", action="store_true", help="the presenting key's own usage"
    )
    add_client_arguments(parser)
    parser.set_defaults(func=show_usage)


def show_usage(args: argparse.Namespace) -> int:
    """Print the usage table (or CSV)."""
    params = {
        name: value
        for name, value in (
            ("key", args.key),
            ("model", args.model),
            ("from", args.start),
            ("to", args.end),
            ("group_by", args.group_by),
        )
        if value
    }
    path = "/v0/usage/self" if args.own else "/v0/usage"
    try:
        answer = client_from_args(args).get(f"{path}?{urlencode(params)}")
    except ApiClientError as exc:
        return report_error(exc)
    columns = [*answer["group_by"], *COUNTERS]
    rows = [[str(row.get(column, "")) for column in columns] for row in answer["usage"]]
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return 0
    header = [column.upper() for column in columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(columns))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    budget = answer.get("budget")
    if budget:
        print(
            f"budget: {budget['spent']} of {budget['budget_tokens']} tokens this "
            f"{budget['budget_period']} ({budget['remaining']} left)"
        )
    return 0
