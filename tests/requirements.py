"""What some tests need beyond the Python packages: skipped where missing, failed under CI.

A developer's machine may lack Debian's ``chromium`` or ``postgresql`` (or, in a partial
install, Playwright): those tests are skipped there. Under CI (``CI`` set; ``.ci/run`` sets
it and installs everything) a missing requirement fails the run instead, so a broken install
can never pass as a run with fewer tests.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def under_ci() -> bool:
    """Whether this run is CI's (``CI`` set to anything but empty, ``0`` or ``false``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def missing(reason: str, hint: str) -> NoReturn:
    """Skip for a missing requirement (the whole module when called at import time); under
    CI fail instead, saying how CI provides it (``hint``)."""
    if under_ci():
        pytest.fail(f"{reason} ({hint})", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, hint: str) -> ModuleType:
    """Import ``name``; when it is not installed, :func:`missing`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed", hint)
