"""llmlb: an OpenAI-compatible load balancer over a fleet of llama.cpp nodes."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    """``__version__`` is read from the installed metadata on first use only.

    ``importlib.metadata`` costs tens of milliseconds, paid by every process that imports
    ``llmlb`` (the node, its downloader workers) though few ever ask for the version.
    """
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("llmlb")
    except PackageNotFoundError:  # running from a source tree without an install
        value = "0.0.0+unknown"
    globals()["__version__"] = value
    return value
