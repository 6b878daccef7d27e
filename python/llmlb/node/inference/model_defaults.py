"""Per-model sampling defaults: what a model's directory says a request should get when the
request itself does not say.

A tiny instruction-tuned model loops without a repetition penalty; that is a fact about the
model, not about a client, so it is stored with the model: a ``generation_defaults.json``
file in the model's directory of the store (``llmlb up`` writes one for its demo model;
anyone may hand-place one beside a GGUF), for example::

    {"temperature": 0.2, "top_p": 0.9, "repeat_penalty": 1.1}

The engine applies it where the sampling parameters of a request are built: every field of
the file replaces the node's default (:class:`SamplingParams`'s) for a request that did not
set that field itself (:attr:`SamplingParams.given`); whatever a request sends wins, the
neutral value too (``"repeat_penalty": 1.0`` turns the model's penalty off). A file that is
missing, not JSON, or holds a field out of range is ignored field by field (logged once),
never an error of the request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from llmlb.node.inference.sampling import SamplingParams

logger = logging.getLogger(__name__)

DEFAULTS_FILENAME = "generation_defaults.json"

# Field -> (least, most) accepted in the file: the same bounds a request is held to.
FIELDS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "top_k": (0, 1_000_000),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repeat_penalty": (0.0, 10.0),
}


@dataclass(frozen=True, slots=True)
class ModelDefaults:
    """The sampling fields a model's directory sets (field name -> value); empty: none."""

    values: dict[str, float | int] = dataclasses.field(default_factory=dict)

    def apply(self, params: SamplingParams) -> SamplingParams:
        """``params`` with every field the request did not set replaced by this model's."""
        changes: dict[str, Any] = {
            name: value for name, value in self.values.items() if name not in params.given
        }
        return dataclasses.replace(params, **changes) if changes else params


NO_DEFAULTS = ModelDefaults()
# model directory -> (mtime_ns of its file, what it held): one stat per request, a read only
# when the file changed.
_cache: dict[str, tuple[int, ModelDefaults]] = {}


def parse(data: Any, source: str = DEFAULTS_FILENAME) -> ModelDefaults:
    """The defaults an object of a ``generation_defaults.json`` sets; bad fields are dropped
    (and logged)."""
    if not isinstance(data, dict):
        logger.warning("%s: not a JSON object; ignored", source)
        return NO_DEFAULTS
    values: dict[str, float | int] = {}
    for name, value in data.items():
        bounds = FIELDS.get(name)
        ok = (
            bounds is not None
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and bounds[0] <= value <= bounds[1]
            and (name != "top_k" or float(value).is_integer())
        )
        if not ok:
            logger.warning("%s: %s=%r is not a sampling default; ignored", source, name, value)
            continue
        values[name] = int(value) if name == "top_k" else float(value)
    return ModelDefaults(values)


def for_model_dir(model_dir: str | os.PathLike[str]) -> ModelDefaults:
    """The defaults stored in ``model_dir`` (:data:`NO_DEFAULTS` when it has no file)."""
    path = Path(model_dir) / DEFAULTS_FILENAME
    key = str(model_dir)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        _cache.pop(key, None)
        return NO_DEFAULTS
    cached = _cache.get(key)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        defaults = parse(orjson.loads(path.read_bytes()), str(path))
    except (OSError, orjson.JSONDecodeError) as exc:
        logger.warning("%s: unreadable (%s); ignored", path, exc)
        defaults = NO_DEFAULTS
    _cache[key] = (mtime, defaults)
    return defaults


def apply(params: SamplingParams, model_dir: str | os.PathLike[str]) -> SamplingParams:
    """``params`` completed with the defaults stored in ``model_dir``: the engine's hook."""
    return for_model_dir(model_dir).apply(params)


def write(model_dir: Path, values: dict[str, float | int]) -> None:
    """Store ``values`` as ``model_dir``'s defaults (atomically; kept when unchanged).

    Raises:
        ValueError: a field is not a sampling default or out of range.
        OSError: the directory cannot be written.
    """
    from llmlb.files import atomic_write

    if parse(values).values != values:
        raise ValueError(f"not valid sampling defaults: {values!r}")
    path = model_dir / DEFAULTS_FILENAME
    data = orjson.dumps(values, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write(path, data)
