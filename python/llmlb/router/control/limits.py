"""A key's limits: what they are, how an admin body sets them, and how they are stored.

Every field is optional; a key without limits behaves as a key always did. Stored as one JSON
column of ``api_keys`` (``limits``), validated here only, so the HTTP API, the CLI (through
it) and the in-memory caches all see one shape.

- ``rpm``: requests per minute; ``tpm``: prompt + completion tokens per minute (both over a
  sliding minute, in one-second steps).
- ``max_parallel``: requests in flight at once.
- ``budget_tokens`` with ``budget_period`` (``day`` or ``month``, UTC): tokens per period.
- ``models``: an allowlist of model ids, or prefixes (an entry ending in ``/`` or ``*``).
- ``priority``: ``high``, ``normal`` or ``low`` (a weight in fair queuing).
- ``expires_at``: RFC 3339 time after which the key is refused (401).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from llmlb.errors import ApiError
from llmlb.model_storage import normalize_model_id

PRIORITIES = ("high", "normal", "low")
# Weights of the priority classes in fair queuing.
PRIORITY_WEIGHTS = {"high": 4.0, "normal": 2.0, "low": 1.0}
BUDGET_PERIODS = ("day", "month")
# Upper bounds: large enough for any fleet, small enough that no sum overflows 64 bits.
MAX_RATE = 10**9
MAX_PARALLEL = 10**6
MAX_BUDGET = 10**15
MAX_MODELS = 256
_INT_FIELDS = {
    "rpm": MAX_RATE,
    "tpm": MAX_RATE,
    "max_parallel": MAX_PARALLEL,
    "budget_tokens": MAX_BUDGET,
}
LIMIT_FIELDS = (*_INT_FIELDS, "budget_period", "models", "priority", "expires_at")


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """One key's limits; ``None`` (or an empty ``models``) means no such limit."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens: int | None = None
    budget_period: str | None = None
    models: tuple[str, ...] | None = None
    priority: str | None = None
    expires_at: str | None = None

    @property
    def empty(self) -> bool:
        """No limit at all (the key behaves as an unlimited one)."""
        return all(getattr(self, f.name) is None for f in fields(self))

    @property
    def expires_ts(self) -> float | None:
        """``expires_at`` as a unix time."""
        return None if self.expires_at is None else _parse_time(self.expires_at, "expires_at")

    @property
    def enforced(self) -> bool:
        """Whether the proxy must count this key's requests (any rate, parallel or budget
        limit)."""
        return (
            self.rpm is not None
            or self.tpm is not None
            or self.max_parallel is not None
            or self.budget_tokens is not None
        )

    def allows(self, model: str) -> bool:
        """Whether ``model`` (a normalised id) is in the allowlist (always, without one)."""
        if self.models is None:
            return True
        base = model.split(":", 1)[0]
        for entry in self.models:
            if entry.endswith(("*", "/")):
                if model.startswith(entry.rstrip("*")):
                    return True
            elif entry in (model, base):
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """The set limits only, JSON-ready."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if f.name == "models" else value
        return out

    def to_json(self) -> str | None:
        """The stored form (``None`` for no limits)."""
        return None if self.empty else orjson.dumps(self.to_dict()).decode()

    @classmethod
    def from_json(cls, text: str | None) -> KeyLimits:
        """Read the stored form (trusted: it was validated when written)."""
        if not text:
            return NO_LIMITS
        doc = orjson.loads(text)
        if "models" in doc:
            doc["models"] = tuple(doc["models"])
        return cls(**{k: v for k, v in doc.items() if k in LIMIT_FIELDS})


NO_LIMITS = KeyLimits()


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_limit", f"'{field}': {message}", param=field)


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _parse_time(text: str, field: str) -> float:
    """Unix time of an RFC 3339 time (``t``/``z`` in either case, any fraction digits, a
    leap second read as the second before)."""
    text = _FRACTION.sub(r"\1", text.upper().replace("Z", "+00:00"))
    text = re.sub(r":60(?=[.+-]|$)", ":59", text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _bad(field, "must be an RFC 3339 time, e.g. 2027-01-31T00:00:00Z") from None
    if moment.tzinfo is None:
        raise _bad(field, "must carry a time zone (e.g. a trailing Z)")
    return moment.timestamp()


def _int(field: str, value: Any) -> int:
    if type(value) is not int:
        raise _bad(field, "must be an integer")
    top = _INT_FIELDS[field]
    if value < 1 or value > top:
        raise _bad(field, f"must be between 1 and {top}")
    return value


def _models(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _bad("models", "must be a non-empty list of model ids or prefixes")
    if len(value) > MAX_MODELS:
        raise _bad("models", f"at most {MAX_MODELS} entries")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise _bad("models", "every entry must be a non-empty string")
        if item.endswith(("*", "/")):
            stem = item.rstrip("*")
            if len(stem) > 256 or any(c.isspace() or c == "\x00" for c in stem):
                raise _bad("models", f"invalid prefix {item!r}")
            out.append(stem.lower() + ("*" if item.endswith("*") else ""))
            continue
        try:
            out.append(normalize_model_id(item))
        except ValueError as exc:
            raise _bad("models", f"invalid model id {item!r}: {exc}") from None
    return tuple(dict.fromkeys(out))


def _expiry(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise _bad("expires_at", "must be an RFC 3339 time string")
    ts = _parse_time(value, "expires_at")
    try:
        moment = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, ValueError, OSError):
        raise _bad("expires_at", "is out of range") from None
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_limits(body: dict[str, Any], base: KeyLimits = NO_LIMITS) -> KeyLimits:
    """Apply the limit fields of an admin body to ``base``; ``null`` removes a limit.

    Args:
        body: the fields to set (other keys of the body must have been taken out by the
            caller: any left is refused as unknown).
        base: the key's current limits (none for a new key).

    Raises:
        ApiError: 400 ``invalid_limit`` naming the field (``param``): an unknown field, a
            wrong type, a value out of range, a ``budget_tokens`` without ``budget_period``
            or the reverse.
    """
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if name not in LIMIT_FIELDS:
            raise ApiError(400, "unknown_field", f"unknown field '{name}'", param=name)
        if value is None:
            changes[name] = None
        elif name in _INT_FIELDS:
            changes[name] = _int(name, value)
        elif name == "budget_period":
            if value not in BUDGET_PERIODS:
                raise _bad(name, "must be 'day' or 'month'")
            changes[name] = value
        elif name == "priority":
            if value not in PRIORITIES:
                raise _bad(name, "must be 'high', 'normal' or 'low'")
            changes[name] = value
        elif name == "models":
            changes[name] = _models(value)
        else:
            changes[name] = _expiry(value)
    limits = replace(base, **changes)
    if (limits.budget_tokens is None) != (limits.budget_period is None):
        field = "budget_period" if limits.budget_period is None else "budget_tokens"
        raise _bad(field, "budget_tokens and budget_period are set together")
    return limits
