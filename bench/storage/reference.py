"""Pure-Python reference implementation of the store checks, for benchmarking only.

It performs the same checks as the C++ core (``native/``): GGUF header, metadata and tensor
infos (alignment, truncation, splits); safetensors header, dtypes, contiguous offsets and
file size; the sharded index's weight_map; config.json and tokenizer.json parse. It is
written the way one would write it in Python (``json``, ``struct``, ``os.scandir``), not
deliberately slow, and serial: the checks are CPU-bound, so threads would not help it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field

_ID_SEGMENT = re.compile(r"[a-z0-9._-]+")
_SPLIT = re.compile(r"^(.*)-(\d{1,9})-of-(\d{1,9})\.gguf$", re.IGNORECASE)
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 30: "IQ4_XS", 32: "BF16",
}  # fmt: skip
_GGML = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
         10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
         24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2)}  # fmt: skip
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INT_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "I16": 16, "U16": 16,
            "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64,
            "U64": 64}  # fmt: skip


def normalize_model_id(raw: str) -> str:
    """Lowercase and validate an id (same rules as the native module)."""
    model_id = raw.lower()
    if len(model_id) > 256 or not model_id:
        raise ValueError(raw)
    base, _, quant = model_id.partition(":")
    if ":" in model_id and (not quant or ":" in quant or not _ID_SEGMENT.fullmatch(quant)):
        raise ValueError(raw)
    for segment in base.split("/"):
        if segment in (".", "..") or not _ID_SEGMENT.fullmatch(segment):
            raise ValueError(raw)
    return model_id


@dataclass
class Descriptor:
    id: str
    format: str
    primary_path: str
    files: list[str]
    quantization: str | None
    size_bytes: int
    architecture: str | None = None


@dataclass
class _Gguf:
    problems: list[str] = field(default_factory=list)
    architecture: str = ""
    quantization: str = ""
    split_count: int | None = None
    split_no: int | None = None
    tensor_count: int = 0


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Truncated
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", "replace")

    def skip_value(self, kind: int) -> None:
        if kind == 8:
            length = self.u64()
            self.pos += length
        elif kind == 9:
            elem, count = self.u32(), self.u64()
            if elem in _SCALAR:
                self.take(_SCALAR[elem] * count)
            else:
                for _ in range(count):
                    self.skip_value(elem)
        else:
            self.take(_SCALAR[kind])
        if self.pos > len(self.data):
            raise _Truncated


def read_gguf(path: str) -> _Gguf:
    """Parse and check one GGUF file."""
    info = _Gguf()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(min(size, 16 << 20))  # the header; tensor data is never read
    if data[:4] != b"GGUF":
        info.problems.append("bad magic")
        return info
    r = _Reader(data)
    r.take(4)
    try:
        version = r.u32()
        if version not in (2, 3):
            info.problems.append(f"unsupported GGUF version {version}")
            return info
        info.tensor_count, kv_count = r.u64(), r.u64()
        alignment = 32
        for _ in range(kv_count):
            key, kind = r.string(), r.u32()
            if key == "general.architecture" and kind == 8:
                info.architecture = r.string()
            elif key == "general.alignment" and kind == 4:
                alignment = r.u32()
            elif key in ("general.file_type", "split.no", "split.count") and kind in _INT_FMT:
                fmt = _INT_FMT[kind]
                value = struct.unpack(fmt, r.take(struct.calcsize(fmt)))[0]
                if key == "general.file_type":
                    info.quantization = _FILE_TYPES.get(value, "")
                elif key == "split.no":
                    info.split_no = value
                else:
                    info.split_count = value
            else:
                r.skip_value(kind)
        tensors = []
        for _ in range(info.tensor_count):
            name = r.string()
            dims = [r.u64() for _ in range(r.u32())]
            kind, offset = r.u32(), r.u64()
            block, block_bytes = _GGML[kind]
            count = 1
            for d in dims[1:]:
                count *= d
            tensors.append((name, offset, dims[0] // block * block_bytes * count))
        data_offset = (r.pos + alignment - 1) // alignment * alignment
        end = 0
        for name, offset, nbytes in tensors:
            if offset % alignment:
                info.problems.append(f"tensor data not aligned for mmap: tensor '{name}'")
            end = max(end, data_offset + offset + nbytes)
        if end > size:
            info.problems.append("truncated tensor data")
    except (_Truncated, KeyError, struct.error):
        info.problems.append("truncated or corrupt header")
    return info


def check_safetensors(path: str) -> tuple[list[str], set[str]]:
    """Check one .safetensors file; returns (problems, tensor names)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        if len(head) < 8:
            return ["file too small"], set()
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            return ["header too large"], set()
        if n > size - 8:
            return ["header length exceeds file size"], set()
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            return [f"header is not valid JSON: {exc}"], set()
    if not isinstance(header, dict):
        return ["header is not a JSON object"], set()
    problems: list[str] = []
    spans = []
    names = set()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        names.add(name)
        bits = _ST_BITS.get(entry.get("dtype"))
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if bits is None or not isinstance(shape, list) or not isinstance(offsets, list):
            problems.append(f"tensor {name}: invalid entry")
            continue
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if count * bits // 8 != end - begin:
            problems.append(f"tensor {name}: size does not match data_offsets")
            continue
        spans.append((begin, end, name))
    if problems:
        return problems, names
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            return [f"data_offsets not contiguous at tensor {name}"], names
        expected = end
    if 8 + n + expected != size:
        problems.append(f"file size mismatch: expected {8 + n + expected}, got {size}")
    return problems, names


def _check_json(directory: str, name: str, problems: list[str]) -> None:
    try:
        with open(os.path.join(directory, name), "rb") as f:
            json.load(f)
    except FileNotFoundError:
        problems.append(f"{name} missing")
    except ValueError as exc:
        problems.append(f"{name}: {exc}")


def _contained(name: str) -> bool:
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and all(p not in ("", ".", "..") for p in parts)
    )


class ReferenceStorage:
    """Same operations as ``llmlb.model_storage.ModelStorage``, in pure Python."""

    def __init__(self, models_dir: str | os.PathLike[str]):
        self.models_dir = os.fspath(models_dir)

    def _scan(self, directory: str) -> dict:
        scan: dict = {"gguf": [], "safetensors": [], "index": [], "files": [], "subdirs": False}
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return scan
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                scan["subdirs"] = True
                continue
            scan["files"].append(e.name)
            lower = e.name.lower()
            if lower.endswith(".gguf"):
                scan["gguf"].append(e.name)
            elif lower.endswith(".safetensors.index.json"):
                scan["index"].append(e.name)
            elif lower.endswith(".safetensors"):
                scan["safetensors"].append(e.name)
        return scan

    @staticmethod
    def _variants(gguf_files: list[str]) -> list[tuple[str, int, dict[int, str]]]:
        variants: dict[tuple[str, int], dict[int, str]] = {}
        for name in gguf_files:
            m = _SPLIT.match(name)
            if m:
                variants.setdefault((m[1] + ".gguf", int(m[3])), {})[int(m[2])] = name
            else:
                variants[(name, 1)] = {1: name}
        return [(label, count, parts) for (label, count), parts in variants.items()]

    def _inspect_gguf(self, directory, model_id, variant) -> tuple[Descriptor | None, list[str]]:
        label, count, parts = variant
        problems: list[str] = []
        files = []
        first = None
        for k in range(1, count + 1):
            if k not in parts:
                problems.append(f"missing split {k} of {count}")
                continue
            path = os.path.join(directory, parts[k])
            info = read_gguf(path)
            problems += [f"{parts[k]}: {p}" for p in info.problems]
            if count > 1 and info.split_count != count:
                problems.append(f"{parts[k]}: split count mismatch")
            first = first or info
            files.append(path)
        if problems or first is None:
            return None, problems
        size = sum(os.stat(p).st_size for p in files)
        return Descriptor(
            model_id,
            "gguf",
            files[0],
            files,
            first.quantization or None,
            size,
            first.architecture or None,
        ), []

    def _inspect_safetensors(self, directory, model_id, scan):
        problems: list[str] = []
        _check_json(directory, "config.json", problems)
        _check_json(directory, "tokenizer.json", problems)
        files = []
        if scan["index"]:
            primary = os.path.join(directory, scan["index"][0])
            with open(primary, "rb") as f:
                weight_map = json.load(f)["weight_map"]
            shards: dict[str, list[str]] = {}
            for tensor, shard in weight_map.items():
                shards.setdefault(shard, []).append(tensor)
            for shard, tensors in shards.items():
                if not _contained(shard):
                    problems.append(f"shard path escapes model directory: {shard}")
                    continue
                path = os.path.join(directory, shard)
                if not os.path.isfile(path):
                    problems.append(f"missing shard {shard}")
                    continue
                shard_problems, names = check_safetensors(path)
                problems += [f"{shard}: {p}" for p in shard_problems]
                problems += [
                    f"tensor {t} named in weight_map missing from shard {shard}"
                    for t in tensors
                    if t not in names
                ]
                files.append(path)
        else:
            primary = os.path.join(directory, scan["safetensors"][0])
            problems += [f"{scan['safetensors'][0]}: {p}" for p in check_safetensors(primary)[0]]
        if problems:
            return None, problems
        files = sorted({*files, *(os.path.join(directory, f) for f in scan["files"])})
        size = sum(os.stat(p).st_size for p in files)
        return Descriptor(model_id, "safetensors", primary, files, None, size), []

    def inspect(self, model_id: str) -> tuple[Descriptor | None, list[str]]:
        """``(descriptor or None, problems)``."""
        model_id = normalize_model_id(model_id)
        base, _, quant = model_id.partition(":")
        directory = os.path.join(self.models_dir, base)
        if not os.path.isdir(directory):
            return None, [f"model directory not found: {directory}"]
        scan = self._scan(directory)
        variants = self._variants(scan["gguf"])
        has_st = bool(scan["safetensors"] or scan["index"])
        if quant:
            chosen = [v for v in variants if quant in v[0].lower()]
            if len(chosen) != 1:
                return None, [f"no single GGUF file matches quantization '{quant}'"]
            return self._inspect_gguf(directory, model_id, chosen[0])
        if len(variants) > 1 or (variants and has_st):
            return None, ["several candidate files and no ':QUANT' to choose"]
        if variants:
            return self._inspect_gguf(directory, model_id, variants[0])
        if has_st:
            return self._inspect_safetensors(directory, model_id, scan)
        return None, ["no model files found"]

    def validate(self, model_id: str) -> list[str]:
        """Problems found; ``[]`` when valid."""
        return self.inspect(model_id)[1]

    def resolve(self, model_id: str) -> Descriptor | None:
        """The descriptor of a valid model, else ``None``."""
        return self.inspect(model_id)[0]

    def list_available(self) -> list[str]:
        """Sorted ids of valid models (recursive; dot-dirs and model subdirs skipped)."""
        found: list[str] = []
        markers = (".gguf", ".safetensors", ".safetensors.index.json")

        def walk(directory: str, rel: str) -> None:
            scan = self._scan(directory)
            if rel and (
                any(f.lower().endswith(markers) for f in scan["files"])
                or "config.json" in scan["files"]
            ):
                descriptor, _ = self.inspect(rel)
                if descriptor:
                    found.append(rel)
                return
            for entry in os.scandir(directory):
                if entry.is_dir() and not entry.name.startswith("."):
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    try:
                        if normalize_model_id(child) == child:
                            walk(entry.path, child)
                    except ValueError:
                        continue

        if os.path.isdir(self.models_dir):
            walk(self.models_dir, "")
        return sorted(found)
