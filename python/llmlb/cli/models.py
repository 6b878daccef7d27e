"""``llmlb models …``, ``llmlb nodes ls|approve|revoke`` and ``llmlb pull``.

``models`` and ``nodes`` talk to a router's admin API (``--router``/``--api-key``, defaults
``LLMLB_ROUTER_URL``/``LLMLB_ADMIN_KEY``). ``pull`` runs on a node machine and downloads a
registered model into the local store with the node's own downloader (``llmlb chat`` is in
:mod:`llmlb.cli.chat`). Every list command takes ``--json``; errors are one line on stderr
and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from llmlb import config
from llmlb.cli.api_client import (
    add_client_arguments,
    client_command,
    client_from_args,
    delete_and_say,
    path_segment,
)
from llmlb.cli.progress import ModelProgress, PullDisplay, human_bytes, progress_from_nodes


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models``, ``nodes`` and ``pull``."""
    models = subparsers.add_parser("models", help="register, list and remove models")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    reg = client_command(
        sub, "register", register_model, "register a hub model; nodes then download it"
    )
    reg.add_argument("repo", help="hub repo (Org/Name) or its URL")
    reg.add_argument("--filename", help="which artifact when the repo has several")
    reg.add_argument("--revision", help="branch, tag or commit (default main)")
    reg.add_argument("--id", dest="model_id", help="model id (default: the repo, lowercased)")
    reg.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template file, for models whose GGUF has none",
    )
    reg.add_argument("--json", action="store_true", help="print the stored model as JSON")
    ls = client_command(
        sub, "ls", list_models, "list models with their ready nodes and download progress"
    )
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    rm = client_command(
        sub, "rm", remove_model, "unregister a model (nodes delete their downloaded copy)"
    )
    rm.add_argument("model_id", metavar="ID")

    nodes = subparsers.add_parser("nodes", help="list, approve and revoke the router's nodes")
    nodes_sub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION", required=True)
    nodes_ls = client_command(nodes_sub, "ls", list_nodes, "list nodes with their state and models")
    nodes_ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    for action, text in (
        ("approve", "approve a pending node: it serves clients and joins the peer lists"),
        ("revoke", "make a node pending again: no client traffic, out of the peer lists"),
    ):
        client_command(nodes_sub, action, approve_node, text, action=action).add_argument(
            "node_id", metavar="ID"
        )

    pull = subparsers.add_parser(
        "pull", help="download a registered model into this machine's store (node side)"
    )
    pull.add_argument("model_id", metavar="MODEL_ID")
    pull.add_argument("--models-dir", help="store root (default: XLLM_MODELS_DIR, …)")
    pull.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="also download from this host (repeatable)",
    )
    add_client_arguments(
        pull, key_help="node or admin key (default $LLMLB_NODE_KEY, else $LLMLB_ADMIN_KEY)"
    )
    pull.set_defaults(func=pull_model)


# --- models ------------------------------------------------------------------------------


def register_model(args: argparse.Namespace) -> int:
    """``POST /v1/models/register`` and print what the router stored."""
    body: dict[str, Any] = {"repo": args.repo}
    for name, value in (
        ("filename", args.filename),
        ("revision", args.revision),
        ("id", args.model_id),
    ):
        if value:
            body[name] = value
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as fh:
                body["chat_template"] = fh.read()
        except OSError as exc:
            return _fail(f"cannot read {args.chat_template}: {exc.strerror or exc}")
    model = client_from_args(args).post("/v1/models/register", body)
    if args.json:
        _print_json(model)
        return 0
    revision = str(model.get("revision") or "")[:12]
    print(
        f"registered {model.get('id')} ({model.get('format')}, "
        f"{human_bytes(model.get('size_bytes'))}, revision {revision}); "
        "nodes download it now — watch with `llmlb models ls`"
    )
    return 0


def list_models(args: argparse.Namespace) -> int:
    """Table of models: id, format, size, ready nodes, download progress."""
    client = client_from_args(args)
    entries = client.get("/v1/models").get("data", [])
    nodes = client.get("/v0/nodes").get("nodes", [])
    rows = []
    for entry in entries:
        progress = progress_from_nodes(nodes, entry["id"])
        rows.append((entry, progress))
    if args.json:
        _print_json([{**entry, "progress": _progress_dict(p)} for entry, p in rows])
        return 0
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "FORMAT", "SIZE", "READY NODES", "PROGRESS"):
        table.add_column(column, justify="right" if column in ("SIZE", "READY NODES") else "left")
    for entry, progress in rows:
        table.add_row(
            entry["id"],
            entry.get("format") or "-",
            human_bytes(entry.get("size_bytes")),
            str(entry.get("nodes_ready", progress.nodes_ready)),
            progress.describe(),
        )
    _console().print(table)
    return 0


def _progress_dict(progress: ModelProgress) -> dict[str, Any]:
    return {
        "state": progress.state,
        "bytes": progress.bytes,
        "total": progress.total,
        "error": progress.error,
        "nodes_downloading": progress.downloading,
    }


def remove_model(args: argparse.Namespace) -> int:
    """``DELETE /v1/models/{id}``."""
    path = f"/v1/models/{_quote_id(args.model_id)}"
    return delete_and_say(args, path, f"removed {args.model_id}")


# --- nodes -------------------------------------------------------------------------------


def list_nodes(args: argparse.Namespace) -> int:
    """Table of nodes: id, url, status, approval, backend, slots, active requests, models,
    last seen."""
    nodes = client_from_args(args).get("/v0/nodes").get("nodes", [])
    if args.json:
        _print_json(nodes)
        return 0
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ("NODE", "URL", "STATUS", "APPROVAL", "GPU", "SLOTS", "ACTIVE", "MODELS", "LAST SEEN")
    for column in columns:
        table.add_column(column)
    for node in nodes:
        table.add_row(
            str(node.get("node_id")),
            str(node.get("url")),
            str(node.get("status")),
            str(node.get("approval") or "-"),
            str((node.get("gpu") or {}).get("backend") or "-"),
            str(node.get("slots")),
            str(node.get("active_requests", 0)),
            _node_models(node.get("models") or []),
            str(node.get("last_seen") or "-"),
        )
    _console().print(table)
    return 0


def approve_node(args: argparse.Namespace) -> int:
    """``POST /v0/nodes/{id}/approve`` (or ``/revoke``)."""
    answer = client_from_args(args).post(
        f"/v0/nodes/{path_segment(args.node_id)}/{args.action}", {}
    )
    print(f"node {answer.get('node_id', args.node_id)}: {answer.get('approval')}")
    return 0


def _node_models(models: list[dict[str, Any]]) -> str:
    parts = []
    for model in models:
        state = model.get("state")
        parts.append(model["id"] if state == "ready" else f"{model['id']} ({state})")
    return ", ".join(parts) or "-"


# --- pull --------------------------------------------------------------------------------


def pull_model(args: argparse.Namespace) -> int:
    """Download a model into the local store; exit 0 only when it validates."""
    from llmlb.cli import pull
    from llmlb.errors import DownloadError
    from llmlb.model_storage import InvalidModelId, ModelStorage, normalize_model_id

    try:
        model_id = normalize_model_id(args.model_id)
    except InvalidModelId as exc:
        return _fail(f"{exc} (invalid_model_id)")
    try:
        root = config.models_dir(args.models_dir)
    except ValueError as exc:
        return _fail(str(exc))
    key = args.api_key or config.node_key() or config.admin_key()
    hosts = list(dict.fromkeys([*config.default_allowed_hosts(), *args.allow_host]))
    try:
        with PullDisplay(model_id) as display:
            descriptor = pull.pull_model(
                model_id,
                router_url=args.router or config.router_url(),
                api_key=key,
                models_dir=root,
                allowed_hosts=hosts,
                progress=display,
            )
    except DownloadError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{model_id}: {exc}")
    problems = ModelStorage(str(root)).validate(model_id)
    if problems:
        return _fail(f"{model_id} does not validate: {'; '.join(problems)}")
    print(
        f"{model_id} is ready in {root / model_id} ({descriptor.format}, "
        f"{human_bytes(descriptor.size_bytes)})"
    )
    return 0


# --- helpers -----------------------------------------------------------------------------


def _quote_id(model_id: str) -> str:
    """A model id for a path: hierarchical ids keep their ``/``."""
    return urllib.parse.quote(model_id, safe="/:")


def _console() -> Console:
    """Console for tables: the terminal's width, or wide enough not to cut ids in a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=240)


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
