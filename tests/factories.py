"""Builders for tiny model files and store layouts that tests generate on the fly.

Everything is written by hand (no third-party writer) so each test can produce exactly the
valid file or the one corruption it needs:

- :func:`write_gguf` - one GGUF file (any arch / file type / split keys / tensors), with
  optional truncation, misaligned tensor data, bad magic or version.
- :func:`write_split_gguf` - a complete or partial split GGUF set
  (``<prefix>-00001-of-0000N.gguf`` ...).
- :func:`write_safetensors` - one ``.safetensors`` file, optionally with a lying header.
- :func:`write_safetensors_model` - ``config.json`` + ``tokenizer.json`` + a single
  ``model.safetensors`` or ``model.safetensors.index.json`` with N shards.
- :func:`write_config` / :func:`write_tokenizer` - the small JSON companions.
- :func:`write_gguf_model` / :func:`make_store_model` - a model placed under
  ``<models_dir>/<model-id>/`` as the node's store keeps it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# llama.cpp's llama_ftype values for general.file_type.
FILE_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22,
    "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28,
    "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
    "MXFP4_MOE": 38,
}  # fmt: skip

# ggml tensor types: name -> (id, elements per block, bytes per block).
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144), "Q6_K": (14, 256, 210), "BF16": (30, 1, 2),
}  # fmt: skip

# GGUF metadata value types.
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)

# safetensors dtype -> bytes per element.
ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}

# A tensor spec for write_gguf: (name, shape with ne0 first, ggml type name).
GgufTensor = tuple[str, Sequence[int], str]
DEFAULT_GGUF_TENSORS: tuple[GgufTensor, ...] = (
    ("token_embd.weight", (32, 2), "F32"),
    ("output_norm.weight", (32,), "F32"),
)


def _gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _gguf_kv(key: str, value: Any) -> bytes:
    """Encode one metadata pair, choosing the GGUF type from the Python value.

    ``int`` -> uint32, ``bool`` -> bool, ``float`` -> float32, ``str`` -> string,
    ``list[str]`` / ``list[int]`` -> array; ``(type_id, raw_bytes)`` writes a raw value.
    """
    head = _gguf_string(key)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes):
        return head + struct.pack("<I", value[0]) + value[1]
    if isinstance(value, bool):
        return head + struct.pack("<IB", _BOOL, value)
    if isinstance(value, int):
        return head + struct.pack("<II", _U32, value)
    if isinstance(value, float):
        return head + struct.pack("<If", _F32, value)
    if isinstance(value, str):
        return head + struct.pack("<I", _STR) + _gguf_string(value)
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            body = b"".join(_gguf_string(v) for v in value)
            return head + struct.pack("<IIQ", _ARR, _STR, len(value)) + body
        body = b"".join(struct.pack("<i", v) for v in value)
        return head + struct.pack("<IIQ", _ARR, _I32, len(value)) + body
    raise TypeError(f"cannot encode {key}={value!r}")


def _tensor_nbytes(shape: Sequence[int], type_name: str) -> int:
    _type_id, block, size = GGML_TYPES[type_name]
    count = 1
    for dim in shape[1:]:
        count *= dim
    return shape[0] // block * size * count


def gguf_bytes(
    *,
    arch: str | None = "llama",
    file_type: str | int | None = "Q4_K_M",
    name: str | None = None,
    split: tuple[int, int] | None = None,
    split_tensors_count: int | None = None,
    tensors: Iterable[GgufTensor] = DEFAULT_GGUF_TENSORS,
    alignment: int | None = None,
    version: int = 3,
    magic: bytes = b"GGUF",
    context_length: int | None = 2048,
    extra_kv: dict[str, Any] | None = None,
    misalign: bool = False,
) -> bytes:
    """The bytes of a small GGUF file; see :func:`write_gguf` for the arguments."""
    kv: dict[str, Any] = {}
    if arch is not None:
        kv["general.architecture"] = arch
    if name is not None:
        kv["general.name"] = name
    if file_type is not None:
        kv["general.file_type"] = FILE_TYPES[file_type] if isinstance(file_type, str) else file_type
    if alignment is not None:
        kv["general.alignment"] = alignment
    if arch is not None and context_length is not None:
        kv[f"{arch}.context_length"] = context_length
    if split is not None:
        no, count = split
        kv["split.no"] = (_U16, struct.pack("<H", no - 1))
        kv["split.count"] = (_U16, struct.pack("<H", count))
        if split_tensors_count is not None:
            kv["split.tensors.count"] = (_I32, struct.pack("<i", split_tensors_count))
    kv.update(extra_kv or {})

    align = alignment or 32
    tensor_list = list(tensors)
    infos = b""
    data = b""
    offset = 0
    for i, (tname, shape, type_name) in enumerate(tensor_list):
        nbytes = _tensor_nbytes(shape, type_name)
        type_id = GGML_TYPES[type_name][0]
        infos += _gguf_string(tname) + struct.pack("<I", len(shape))
        infos += b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", type_id, offset)
        payload = bytes((i + j) % 251 for j in range(nbytes))
        data += payload
        offset += nbytes
        if not misalign:
            pad = -offset % align
            data += b"\0" * pad
            offset += pad

    header = magic + struct.pack("<IQQ", version, len(tensor_list), len(kv))
    header += b"".join(_gguf_kv(k, v) for k, v in kv.items()) + infos
    header += b"\0" * (-len(header) % align)
    return header + data


def write_gguf(path: Path, *, truncate: int | bool = False, **kwargs: Any) -> Path:
    """Write a small GGUF file and return its path.

    Args:
        path: the file to write (parents are created).
        truncate: drop this many bytes from the end (``True``: 16 bytes), leaving tensor
            data that runs past the end of the file.
        arch: ``general.architecture`` (``None`` omits it).
        file_type: ``general.file_type`` as a name (``"Q4_K_M"``) or llama_ftype int.
        name: ``general.name``.
        split: ``(k, n)`` with k 1-based; writes ``split.no = k - 1`` and ``split.count = n``.
        split_tensors_count: ``split.tensors.count`` (only with ``split``).
        tensors: ``(name, shape, ggml type name)`` triples; shape has ne0 first.
        alignment: ``general.alignment`` (``None``: omitted, 32 applies).
        version: the GGUF version field.
        magic: the first four bytes.
        context_length: ``<arch>.context_length``.
        extra_kv: more metadata (see ``_gguf_kv`` for the encoding).
        misalign: pack tensor data without padding so offsets are not aligned.
    """
    raw = gguf_bytes(**kwargs)
    if truncate:
        raw = raw[: -(16 if truncate is True else int(truncate))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def split_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's split file name: ``<prefix>-0000k-of-0000N.gguf``."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def write_split_gguf(
    directory: Path,
    prefix: str,
    count: int,
    *,
    skip: Iterable[int] = (),
    header_counts: dict[int, int] | None = None,
    **kwargs: Any,
) -> list[Path]:
    """Write a split GGUF set ``<prefix>-0000k-of-0000N.gguf`` (one tensor per split).

    Args:
        directory: where the splits go.
        prefix: file name prefix, e.g. ``"model-Q4_K_M"``.
        count: number of splits N.
        skip: split numbers (1-based) to leave out.
        header_counts: split number -> ``split.count`` to write instead of N (a mismatch).
        kwargs: passed to :func:`write_gguf` for every split (split 1 carries the metadata).

    Returns:
        The paths written, in split order.
    """
    paths = []
    skipped = set(skip)
    for no in range(1, count + 1):
        if no in skipped:
            continue
        header_count = (header_counts or {}).get(no, count)
        options = dict(kwargs)
        options.setdefault("tensors", [(f"blk.{no - 1}.weight", (32,), "F32")])
        if no > 1:  # llama.cpp's gguf-split puts full metadata in the first split only
            options.setdefault("arch", None)
            options.setdefault("file_type", None)
        else:
            options.setdefault("split_tensors_count", count * len(list(options["tensors"])))
        paths.append(
            write_gguf(
                directory / split_name(prefix, no, count), split=(no, header_count), **options
            )
        )
    return paths


def safetensors_bytes(
    tensors: dict[str, tuple[str, Sequence[int]]] | None = None,
    *,
    metadata: dict[str, str] | None = None,
    offsets: dict[str, tuple[int, int]] | None = None,
    header_len: int | None = None,
    extra_bytes: int = 0,
    raw_header: bytes | None = None,
) -> bytes:
    """The bytes of a ``.safetensors`` file; see :func:`write_safetensors`."""
    tensors = tensors if tensors is not None else {"weight": ("F32", (4, 4))}
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    position = 0
    for tname, (dtype, shape) in tensors.items():
        size = ST_DTYPES[dtype]
        for dim in shape:
            size *= dim
        begin, end = (offsets or {}).get(tname, (position, position + size))
        header[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        position = max(position, end)
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    length = len(text) if header_len is None else header_len
    return struct.pack("<Q", length) + text + bytes(position + extra_bytes)


def write_safetensors(
    path: Path,
    tensors: dict[str, tuple[str, Sequence[int]]] | None = None,
    *,
    truncate: int = 0,
    **kwargs: Any,
) -> Path:
    """Write a ``.safetensors`` file (zero-filled data) and return its path.

    Args:
        path: the file to write (parents are created).
        tensors: name -> ``(dtype, shape)``, laid out contiguously in this order
            (default: one ``F32[4, 4]`` tensor named ``weight``).
        truncate: drop this many bytes from the end (a file size mismatch).
        metadata: the ``__metadata__`` string map.
        offsets: name -> ``(begin, end)`` overriding the computed ``data_offsets``.
        header_len: the 8-byte header length to write instead of the true one.
        extra_bytes: trailing bytes appended after the data (a file size mismatch).
        raw_header: header bytes written verbatim instead of the JSON built from tensors.
    """
    raw = safetensors_bytes(tensors, **kwargs)
    if truncate:
        raw = raw[:-truncate]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def write_config(directory: Path, model_type: str = "llama", **fields: Any) -> Path:
    """Write a minimal ``config.json`` (``model_type``, ``architectures`` and ``fields``)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": model_type,
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 2048,
        **fields,
    }
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def write_tokenizer(directory: Path) -> Path:
    """Write a minimal ``tokenizer.json`` (a tiny word-level vocabulary)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = {
        "version": "1.0",
        "model": {
            "type": "WordLevel",
            "vocab": {"<unk>": 0, "hello": 1, "world": 2},
            "unk_token": "<unk>",
        },
        "added_tokens": [],
    }
    path = directory / "tokenizer.json"
    path.write_text(json.dumps(tokenizer))
    return path


def shard_name(no: int, count: int) -> str:
    """Hugging Face's shard name: ``model-0000k-of-0000N.safetensors``."""
    return f"model-{no:05d}-of-{count:05d}.safetensors"


def write_safetensors_model(
    directory: Path,
    *,
    shards: int = 1,
    tensors_per_shard: int = 2,
    shape: Sequence[int] = (4, 4),
    config: bool = True,
    tokenizer: bool = True,
    index: bool | None = None,
    weight_map_extra: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors model directory and return its primary file.

    Args:
        directory: the model directory (created).
        shards: 1 writes ``model.safetensors`` (unless ``index=True``); N > 1 writes
            ``model.safetensors.index.json`` and ``model-0000k-of-0000N.safetensors``.
        tensors_per_shard: F32 tensors ``layers.<k>.<i>.weight`` in each shard.
        shape: shape of every tensor.
        config / tokenizer: whether to write ``config.json`` / ``tokenizer.json``.
        index: force (True) or forbid (False) the index for a single shard.
        weight_map_extra: more ``tensor -> file`` entries for the index (to corrupt it).

    Returns:
        The index path, or the single ``model.safetensors`` path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if config:
        write_config(directory)
    if tokenizer:
        write_tokenizer(directory)
    use_index = shards > 1 if index is None else index
    weight_map: dict[str, str] = {}
    for no in range(1, shards + 1):
        file_name = shard_name(no, shards) if use_index else "model.safetensors"
        names = {
            f"layers.{no - 1}.{i}.weight": ("F32", tuple(shape)) for i in range(tensors_per_shard)
        }
        write_safetensors(directory / file_name, names)
        weight_map.update(dict.fromkeys(names, file_name))
    if not use_index:
        return directory / "model.safetensors"
    weight_map.update(weight_map_extra or {})
    index_path = directory / "model.safetensors.index.json"
    index_path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index_path


def write_gguf_model(
    models_dir: Path, model_id: str, file_name: str | None = None, **kwargs: Any
) -> Path:
    """Place a single-file GGUF model at ``<models_dir>/<model_id>/<file_name>``.

    ``file_name`` defaults to ``<last id segment>-<file_type>.gguf``; ``kwargs`` go to
    :func:`write_gguf`. Returns the GGUF path.
    """
    file_type = kwargs.get("file_type", "Q4_K_M")
    default = f"{model_id.rsplit('/', 1)[-1]}-{file_type}.gguf"
    return write_gguf(models_dir / model_id / (file_name or default), **kwargs)


def make_store_model(models_dir: Path, model_id: str, kind: str = "gguf") -> Path:
    """Create a valid model of ``kind`` (``gguf``, ``split``, ``safetensors``, ``sharded``)
    under ``<models_dir>/<model_id>/`` and return its directory."""
    directory = models_dir / model_id
    if kind == "gguf":
        write_gguf_model(models_dir, model_id)
    elif kind == "split":
        write_split_gguf(directory, "model-Q8_0", 3, file_type="Q8_0")
    elif kind == "safetensors":
        write_safetensors_model(directory)
    elif kind == "sharded":
        write_safetensors_model(directory, shards=3)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return directory
