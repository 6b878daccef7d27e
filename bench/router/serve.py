"""Serve the router like ``llmlb router`` does, with extra Granian options, optionally from
another source tree (for A/B runs of two versions of the proxy).

    python bench/router/serve.py [--src DIR] [--granian JSON] -- router --port P --workers 1

``--src`` puts ``DIR`` (holding an ``llmlb`` package, with its compiled ``_model_storage``)
first on ``sys.path`` and drops the editable install's import hook, so the router and its
forked Granian workers run that copy. ``--granian`` adds keyword arguments to ``Granian(...)``
(e.g. ``{"runtime_mode": "st", "http": "1"}``).
"""

from __future__ import annotations

import argparse
import json
import sys


def _use_source(src: str) -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if "_editable" not in type(f).__module__]
    sys.path.insert(0, src)
    for name in [m for m in sys.modules if m == "llmlb" or m.startswith("llmlb.")]:
        del sys.modules[name]


def _patch_granian(extra: dict) -> None:
    import granian
    from granian import constants

    enums = {
        "runtime_mode": constants.RuntimeModes,
        "loop": constants.Loops,
        "task_impl": constants.TaskImpl,
        "http": constants.HTTPModes,
    }
    extra = {k: enums[k](v) if k in enums else v for k, v in extra.items()}
    base = granian.Granian

    class Granian(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **extra})

    granian.Granian = Granian


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="directory holding the llmlb package to run")
    parser.add_argument("--granian", default="{}", help="extra Granian(...) kwargs, JSON")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then llmlb CLI arguments")
    args = parser.parse_args()
    if args.src:
        _use_source(args.src)
    _patch_granian(json.loads(args.granian))
    from llmlb.cli.main import main as llmlb_main

    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    return llmlb_main(cli)


if __name__ == "__main__":
    sys.exit(main())
