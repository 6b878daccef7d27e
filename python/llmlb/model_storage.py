"""The node's on-disk model store: model ids, validation, listing, deletion and prefetch.

A thin facade over the C++ core ``llmlb._model_storage``; every call that touches the disk
runs in C++ with the GIL released.

Layout: each model lives in ``<models_dir>/<model-id>/`` under its original file names: a
single ``*.gguf``, a split GGUF (``<name>-00001-of-0000N.gguf`` ...), or ``config.json`` +
``tokenizer.json`` + ``model.safetensors`` (or ``model.safetensors.index.json`` + shards),
with an optional ``model.metal.bin``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmlb import _model_storage as _native
from llmlb.errors import InvalidModelId

__all__ = [
    "InvalidModelId",
    "ModelDescriptor",
    "ModelStorage",
    "downloaded_marker",
    "inspect_gguf",
    "is_safe_relative_path",
    "lock_path",
    "normalize_model_id",
    "parse_split_name",
    "prefetch_files",
    "split_quant",
    "staging_dir",
    "validate_file",
]

#: Dot-directories of the store root (never listed as models): downloads in progress, the
#: per-model download locks, and the records of models downloaded from the router.
STAGING_DIRNAME = ".staging"
LOCKS_DIRNAME = ".locks"
DOWNLOADED_DIRNAME = ".downloaded"
# Sidecar file in a model directory holding its Jinja chat template.
CHAT_TEMPLATE_FILENAME = "chat_template.jinja"


_native._set_invalid_model_id_type(InvalidModelId)


def normalize_model_id(model_id: str) -> str:
    """Lowercase and validate a model id such as ``OpenAI/GPT-OSS-20B`` or ``llama:Q4_K_M``.

    Rules: ``[a-z0-9._-]`` segments joined by ``/``, at most 256 characters, no empty
    segment and none starting with ``.`` (the store's own ``.staging`` and the like), no
    leading or trailing ``/``, no backslash, NUL or other character; an optional ``:QUANT``
    suffix (exactly one colon, text on both sides).

    Raises:
        InvalidModelId: the id breaks a rule (it is never silently rewritten).
    """
    return _native.normalize_model_id(model_id)


def split_quant(model_id: str) -> tuple[str, str | None]:
    """Normalise ``model_id`` and split off its ``:QUANT`` suffix: ``(base_id, quant or None)``.

    Raises:
        InvalidModelId: the id breaks a rule.
    """
    return _native.split_quant(model_id)


def validate_file(path: str | os.PathLike[str]) -> list[str]:
    """Check one ``.gguf``, ``.safetensors`` or ``.json`` file on its own.

    Returns:
        Human-readable problems, each prefixed with the file name; ``[]`` when valid.
    """
    return _native.validate_file(os.fspath(path))


def parse_split_name(name: str) -> tuple[str, int, int] | None:
    """``(prefix, part, count)`` of a split-GGUF name (``<prefix>-00001-of-00003.gguf``), or
    ``None``: the store's own rule, so the router registers the split sets a node accepts."""
    return _native.parse_split_name(name)


def is_safe_relative_path(name: str) -> bool:
    """Whether a file name of a model stays inside the model's directory: the store's one
    rule for the names in manifests, peer requests and safetensors indexes.

    A safe name is relative and not empty, ``/``-separated with no empty, ``.`` or ``..``
    segment, and holds no backslash, NUL or drive letter (``C:``).
    """
    return _native.is_safe_relative_path(name)


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Header facts of one GGUF file: ``version, tensor_count, kv_count, alignment,
    data_offset, architecture, name, file_type, quantization, split_no, split_count,
    context_length`` and ``problems`` (``[]`` when valid)."""
    return _native.inspect_gguf(os.fspath(path))


def prefetch_files(paths: list[str | os.PathLike[str]]) -> int:
    """Schedule page-cache readahead for ``paths`` in parallel; returns the bytes scheduled."""
    return _native.prefetch_files([os.fspath(p) for p in paths])


def staging_dir(models_dir: Path, model_id: str) -> Path:
    """``<models_dir>/.staging/<id>/``: where a download of ``model_id`` is assembled."""
    return Path(models_dir) / STAGING_DIRNAME / model_id


def lock_path(models_dir: Path, model_id: str) -> Path:
    """``<models_dir>/.locks/<id>.lock``: the lock file of ``model_id``'s download."""
    return Path(models_dir) / LOCKS_DIRNAME / f"{model_id}.lock"


def downloaded_marker(models_dir: Path, model_id: str) -> Path:
    """``<models_dir>/.downloaded/<id>.json``: the record that a node downloaded ``model_id``
    from the router (a model without one was placed by hand)."""
    return Path(models_dir) / DOWNLOADED_DIRNAME / f"{model_id}.json"


@dataclass(frozen=True)
class ModelDescriptor:
    """A complete, valid model in the store.

    Attributes:
        id: the normalised id asked for (with ``:quant`` when one was given).
        format: ``"gguf"``, ``"safetensors"`` or ``"metal"``.
        primary_path: the file a loader opens (the ``.gguf``, first split, index or single
            ``.safetensors``).
        files: every artifact of the model.
        quantization: e.g. ``"Q4_K_M"`` from the GGUF header or file name; ``None`` if unknown.
        size_bytes: total size of ``files``.
        architecture: ``general.architecture`` (GGUF) or ``model_type`` (config.json).
        context_length: the model's trained context length when the metadata says.
    """

    id: str
    format: str
    primary_path: Path
    files: tuple[Path, ...]
    quantization: str | None
    size_bytes: int
    architecture: str | None = None
    context_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        data = asdict(self)
        data["primary_path"] = str(self.primary_path)
        data["files"] = [str(p) for p in self.files]
        return data


def _descriptor(raw: dict[str, Any]) -> ModelDescriptor:
    return ModelDescriptor(
        id=raw["id"],
        format=raw["format"],
        primary_path=Path(raw["primary_path"]),
        files=tuple(Path(p) for p in raw["files"]),
        quantization=raw["quantization"],
        size_bytes=raw["size_bytes"],
        architecture=raw["architecture"],
        context_length=raw["context_length"],
    )


class ModelStorage:
    """The model store rooted at ``models_dir`` (which need not exist yet).

    Every method taking a model id normalises it first and raises :class:`InvalidModelId`
    for a malformed one.

    Args:
        models_dir: the store root.
        threads: worker threads for validating shards and listing (``None``: from the CPU
            count).
    """

    def __init__(self, models_dir: str | os.PathLike[str], *, threads: int | None = None):
        self.models_dir = Path(models_dir).expanduser().absolute()
        self._store = _native.ModelStore(str(self.models_dir), threads or 0)

    def __repr__(self) -> str:
        return f"ModelStorage({str(self.models_dir)!r})"

    def model_dir(self, model_id: str) -> Path:
        """``<models_dir>/<base id>``, always inside ``models_dir`` (``:QUANT`` is dropped)."""
        return Path(self._store.model_dir(model_id))

    def list_available(self) -> list[str]:
        """Sorted ids of complete, valid models, found recursively.

        Dot-directories (``.staging``) are skipped. A directory holding several GGUF
        variants lists one ``id:quant`` entry per variant. Two model directories nested in
        one another (``nest`` and ``nest/inner``) conflict: neither is listed.
        """
        return self._store.list_available()

    def conflicting_model(self, model_id: str) -> str | None:
        """An existing model whose directory contains ``model_id``'s or lies inside it.

        ``nest`` for ``nest/inner`` and ``nest/inner`` for ``nest`` (``:QUANT`` is ignored);
        ``None`` when there is none. Promotion into the store refuses such an id.
        """
        return self._store.conflicting_model(model_id)

    def resolve(self, model_id: str) -> ModelDescriptor | None:
        """The model's descriptor, or ``None`` when absent, incomplete, invalid, ambiguous or
        in conflict with another model (see :meth:`conflicting_model`)."""
        raw, _problems = self._store.inspect(model_id)
        return None if raw is None else _descriptor(raw)

    def inspect(self, model_id: str) -> tuple[ModelDescriptor | None, list[str]]:
        """``(descriptor or None, problems)`` in one pass over the files."""
        raw, problems = self._store.inspect(model_id)
        return (None if raw is None else _descriptor(raw)), problems

    def validate(self, model_id: str) -> list[str]:
        """Human-readable problems; ``[]`` means complete and valid."""
        return self._store.validate(model_id)

    def delete_model(self, model_id: str) -> bool:
        """Remove the model (with ``:QUANT``, only that GGUF variant) and any parent
        directories left empty, never leaving ``models_dir`` and never touching another
        model stored inside the model's directory.

        Returns:
            ``True`` when something was removed; ``False`` when there was nothing to remove
            (idempotent) or the id names a namespace of other models rather than a model.

        Raises:
            RuntimeError: the model directory resolves outside ``models_dir``.
        """
        return self._store.delete_model(model_id)

    def detect_format(self, model_id: str) -> str:
        """``"gguf"``, ``"safetensors"``, ``"metal"`` or ``"unknown"`` from the files present."""
        return self._store.detect_format(model_id)

    def prefetch(self, model_id: str) -> int:
        """Warm the page cache for every file of a valid model, in parallel.

        Returns:
            Bytes scheduled for readahead (0 when the model does not resolve).
        """
        return self._store.prefetch(model_id)
