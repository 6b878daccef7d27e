"""``llmlb storage``: list, verify and remove models in the node's local store."""

from __future__ import annotations

import argparse
import sys

import orjson

from llmlb import config
from llmlb.model_storage import InvalidModelId, ModelStorage, normalize_model_id


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``storage ls|verify|rm``."""
    storage = subparsers.add_parser("storage", help="inspect the local model store")
    actions = storage.add_subparsers(dest="storage_command", metavar="ACTION", required=True)

    ls = actions.add_parser("ls", help="list complete, valid models")
    _common(ls)
    ls.set_defaults(func=cmd_ls)

    verify = actions.add_parser(
        "verify", help="check one model's files (exit 0 valid, 1 invalid, 2 bad id)"
    )
    verify.add_argument("model_id")
    _common(verify)
    verify.set_defaults(func=cmd_verify)

    rm = actions.add_parser("rm", help="delete a model from the store")
    rm.add_argument("model_id")
    _common(rm, json_flag=False)
    rm.set_defaults(func=cmd_rm)


def _common(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    parser.add_argument("--models-dir", help="model store root (default: see llmlb.config)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _store(args: argparse.Namespace) -> ModelStorage:
    return ModelStorage(config.models_dir(args.models_dir))


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def cmd_ls(args: argparse.Namespace) -> int:
    """Print the store's valid models (one per line, or a JSON array of descriptors)."""
    store = _store(args)
    descriptors = [d for d in map(store.resolve, store.list_available()) if d is not None]
    if args.json:
        sys.stdout.write(orjson.dumps([d.to_dict() for d in descriptors]).decode() + "\n")
        return 0
    if not descriptors:
        print(f"no models in {store.models_dir}")
        return 0
    width = max(len(d.id) for d in descriptors)
    for d in descriptors:
        quant = d.quantization or "-"
        print(f"{d.id:<{width}}  {d.format:<11}  {quant:<8}  {_human_size(d.size_bytes):>10}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Validate one model; exit 0 when valid, 1 with the problems listed, 2 for a bad id."""
    try:
        model_id = normalize_model_id(args.model_id)
    except InvalidModelId as exc:
        if args.json:
            body = {"id": args.model_id, "valid": False, "error": str(exc)}
            sys.stdout.write(orjson.dumps(body).decode() + "\n")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = _store(args)
    descriptor, problems = store.inspect(model_id)
    if args.json:
        body = {
            "id": model_id,
            "valid": not problems,
            "problems": problems,
            "model": descriptor.to_dict() if descriptor else None,
        }
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
    elif problems:
        print(f"{model_id}: invalid")
        for problem in problems:
            print(f"  - {problem}")
    else:
        assert descriptor is not None
        print(
            f"{model_id}: ok ({descriptor.format}, {len(descriptor.files)} files, "
            f"{_human_size(descriptor.size_bytes)})"
        )
    return 1 if problems else 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete a model; exit 0 when removed, 1 when there was nothing to remove, 2 for a bad id."""
    try:
        model_id = normalize_model_id(args.model_id)
    except InvalidModelId as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = _store(args)
    if store.delete_model(model_id):
        print(f"removed {model_id}")
        return 0
    print(f"{model_id}: not found in {store.models_dir}", file=sys.stderr)
    return 1
