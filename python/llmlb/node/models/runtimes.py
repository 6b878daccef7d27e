"""What this node's runtimes can serve: one rule, used by reports, downloads and serving.

The node serves with llama.cpp (``llama-cpp-python``), which reads GGUF only. A model in
another format (``safetensors``) is not downloaded unless the node stores models for others
(``--store-all``), and is never handed to llama.cpp.
"""

from __future__ import annotations

#: Runtimes of this node, as registration and heartbeat bodies name them (``runtimes``).
RUNTIMES: tuple[str, ...] = ("llama.cpp",)

#: Model formats (the store's and the manifest's ``format``) each runtime serves.
SERVED_FORMATS: dict[str, frozenset[str]] = {"llama.cpp": frozenset({"gguf"})}


def servable(model_format: str | None) -> bool:
    """Whether one of :data:`RUNTIMES` serves models of ``model_format`` (``None``: unknown)."""
    return model_format is not None and any(
        model_format in SERVED_FORMATS.get(runtime, ()) for runtime in RUNTIMES
    )


def not_servable_reason(model_format: str | None) -> str:
    """The ``error`` of a model report (and of a refused request) for a format none serves."""
    return f"no runtime of this node serves {model_format or 'models of an unknown format'}"
