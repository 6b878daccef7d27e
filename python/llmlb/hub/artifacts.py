"""Choosing which files of a hub repo make up the model to register.

Pure functions over a repo's file listing; no network. Rules:

- GGUF: one ``*.gguf`` file, or every split of a split GGUF (``name-00001-of-0000N.gguf``; all N
  must be present). Multimodal projectors (``mmproj*.gguf``) are never a model of their own.
- safetensors: ``config.json`` + ``tokenizer.json`` + ``model.safetensors`` or
  ``model.safetensors.index.json`` and every shard its ``weight_map`` names, plus
  ``tokenizer_config.json`` and ``generation_config.json`` when present.
- ``model.metal.bin``, when present, is added as an optional file for the Metal backend only.

A ``filename`` hint picks among several candidates: a GGUF file (any split names its whole
split set), ``model.safetensors``, its index, or a ``...-00001-of-0000N.safetensors`` shard
(meaning the index); a quantisation tag (``Q4_K_M``) picks the one GGUF of that quantisation.
Without a hint, several candidates raise :class:`~llmlb.errors.AmbiguousArtifacts`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from llmlb.errors import AmbiguousArtifacts, NoSupportedArtifacts
from llmlb.model_storage import parse_split_name

#: Reads and parses one JSON file of the repo (used for the safetensors index).
IndexReader = Callable[[str], object]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
METAL_FILE = "model.metal.bin"
_SAFETENSORS_REQUIRED = ("config.json", "tokenizer.json")
_SAFETENSORS_EXTRAS = ("tokenizer_config.json", "generation_config.json")

_SHARD_SAFETENSORS = re.compile(r"-\d{5}-of-\d{5}\.safetensors$", re.I)
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])("
    r"IQ\d_(?:XXS|XS|S|M|NL|L)"
    r"|TQ\d_\d"
    r"|Q\d_K(?:_(?:XXL|XL|S|M|L))?"
    r"|Q\d_\d(?:_\d_\d)?"
    r"|MXFP4|BF16|FP16|FP32|F16|F32"
    r")(?![A-Za-z0-9])",
    re.I,
)


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo listing: path, size and LFS sha256 (``None`` for plain git files)."""

    path: str
    size: int
    sha256: str | None = None


@dataclass
class Selection:
    """The chosen artifact set, primary file first.

    Attributes:
        format: ``"gguf"`` or ``"safetensors"``.
        primary: the file a loader opens first (the GGUF, its first split, or the index /
            ``model.safetensors``).
        required: every file the model needs, primary first, in download priority order.
        optional: ``(path, backends)`` of extra files a node may skip.
        quantization: from the GGUF filename, e.g. ``Q4_K_M``; ``None`` when unknown.
    """

    format: str
    primary: str
    required: list[str]
    optional: list[tuple[str, list[str]]] = field(default_factory=list)
    quantization: str | None = None


def quantization_from_name(path: str) -> str | None:
    """The quantisation tag in a GGUF path (``gemma-3-270m-it-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    for text in (PurePosixPath(path).name, path):
        matches = _QUANT.findall(text)
        if matches:
            return matches[-1].upper()
    return None


def file_format(path: str) -> str:
    """A manifest ``format`` for one file: gguf, safetensors, json, metal or other."""
    name = PurePosixPath(path).name.lower()
    if name == METAL_FILE:
        return "metal"
    suffix = PurePosixPath(name).suffix
    return {".gguf": "gguf", ".safetensors": "safetensors", ".json": "json"}.get(suffix, "other")


def gguf_choices(paths: list[str]) -> dict[str, list[str]]:
    """GGUF candidates: choice name (the file, or a split set's first file) -> its files."""
    choices: dict[str, list[str]] = {}
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for path in paths:
        name = PurePosixPath(path).name
        if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj"):
            continue
        split = parse_split_name(path)
        if split is not None:
            stem, index, count = split
            splits.setdefault((stem, count), {})[index] = path
        else:
            choices[path] = [path]
    for (_, count), parts in splits.items():
        if count >= 1 and set(parts) == set(range(1, count + 1)):
            ordered = [parts[i] for i in range(1, count + 1)]
            choices[ordered[0]] = ordered
    return dict(sorted(choices.items()))


def safetensors_choice(paths: set[str]) -> str | None:
    """The safetensors choice name (index or ``model.safetensors``) if the basics are there."""
    if not all(name in paths for name in _SAFETENSORS_REQUIRED):
        return None
    if INDEX_NAME in paths:
        return INDEX_NAME
    if SINGLE_SAFETENSORS in paths:
        return SINGLE_SAFETENSORS
    return None


def _pick(hint: str, ggufs: dict[str, list[str]], st_choice: str | None, paths: set[str]) -> str:
    """Map a ``filename`` hint to a choice name."""
    hint = hint.strip().lstrip("/")
    for choice, files in ggufs.items():
        if hint in files:
            return choice
    names_safetensors = hint in (INDEX_NAME, SINGLE_SAFETENSORS) or bool(
        _SHARD_SAFETENSORS.search(hint)
    )
    if st_choice is not None and names_safetensors and (hint in paths or hint == st_choice):
        return st_choice
    by_quant = [c for c in ggufs if quantization_from_name(c) == hint.upper()]
    if len(by_quant) == 1:
        return by_quant[0]
    choices = [*ggufs, *([st_choice] if st_choice else [])]
    if hint in paths:
        raise NoSupportedArtifacts(
            f"{hint} is not a usable model file; usable choices: {', '.join(choices) or 'none'}"
        )
    raise NoSupportedArtifacts(
        f"{hint} is not in the repository; usable choices: {', '.join(choices) or 'none'}"
    )


def select_artifacts(
    files: list[RemoteFile], filename: str | None = None, read_index: IndexReader | None = None
) -> Selection:
    """Choose the model's files from a repo listing.

    Args:
        files: the repo's files.
        filename: optional hint (see the module docstring).
        read_index: ``callable(path) -> dict`` returning the parsed safetensors index; called
            only when the index is selected.

    Returns:
        The :class:`Selection`.

    Raises:
        AmbiguousArtifacts: several candidates and no hint (``choices`` lists them).
        NoSupportedArtifacts: no usable model, or the hint names none.
    """
    paths = {f.path for f in files}
    ggufs = gguf_choices(sorted(paths))
    st_choice = safetensors_choice(paths)
    if filename:
        choice = _pick(filename, ggufs, st_choice, paths)
    else:
        choices = [*ggufs, *([st_choice] if st_choice else [])]
        if not choices:
            raise NoSupportedArtifacts(
                "no GGUF file and no complete safetensors model (config.json, tokenizer.json, "
                "model.safetensors or model.safetensors.index.json) in the repository"
            )
        if len(choices) > 1:
            raise AmbiguousArtifacts(
                f"the repository holds several models; pass filename= one of: {', '.join(choices)}",
                choices,
            )
        choice = choices[0]
    if choice in ggufs:
        selection = Selection(
            "gguf", choice, list(ggufs[choice]), quantization=quantization_from_name(choice)
        )
    else:
        selection = _safetensors_selection(choice, paths, read_index)
    if METAL_FILE in paths:
        selection.optional.append((METAL_FILE, ["metal"]))
    return selection


def _safetensors_selection(
    choice: str, paths: set[str], read_index: IndexReader | None
) -> Selection:
    shards: list[str] = []
    if choice == INDEX_NAME:
        if read_index is None:
            raise NoSupportedArtifacts(f"cannot read {INDEX_NAME}")
        index = read_index(INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise NoSupportedArtifacts(f"{INDEX_NAME} has no weight_map")
        shards = sorted({str(v) for v in weight_map.values()})
        missing = [s for s in shards if s not in paths]
        if missing:
            raise NoSupportedArtifacts(
                f"{INDEX_NAME} names shards missing from the repository: {', '.join(missing)}"
            )
    extras = [name for name in _SAFETENSORS_EXTRAS if name in paths]
    required = [choice, *_SAFETENSORS_REQUIRED, *extras, *shards]
    return Selection("safetensors", choice, list(dict.fromkeys(required)))
