"""Model reports: what a node says of each model it holds (state, progress, transfer
counters), in registrations and heartbeats, and their validation on the router.

Apart because reports travel as plain dicts in their wire form, checked once per heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from llmlb.protocol.fields import (
    _BYTES,
    _READY,
    _STATE_ENUM,
    MODEL_STATES,
    _bad,
    _model_id,
    _optional_bool,
    _optional_int,
    _optional_str,
    _ref,
)


@dataclass(slots=True)
class ModelReport:
    """One model as a node reports it in registrations, heartbeats and its status route.

    Attributes:
        id: the model id.
        state: where the model stands on the node.
        progress: ``(bytes, total)`` of a download; either may be unknown (``None``).
        error: why the model failed.
        format: the model's format (``gguf``, ``safetensors`` …).
        size_bytes: the model's size on disk.
        servable: one of the node's runtimes serves it (``None``: not said; older nodes, taken
            as servable).
        attempts: failed tries in a row of a failed download.
        retry_at: unix time (seconds) of the node's next automatic try.
        revision: the pinned commit the node downloaded the model at (``None``: placed by
            hand, or an older node); the router lists a node as a peer of a model only when
            this matches the manifest's revision.
        bytes_from_hub: bytes of the model's last download that came from the hub.
        bytes_from_peers: bytes of it that came from other nodes.
        uploads: transfers of the model's files to other nodes in progress.
        bytes_served: bytes of the model this node served to other nodes.
        serves_peers: ``False`` when the node serves no other node (no upload budget): the
            router then never lists it as a peer (``None``: it does).
    """

    id: str
    state: str
    progress: tuple[int | None, int | None] | None = None
    error: str | None = None
    format: str | None = None
    size_bytes: int | None = None
    servable: bool | None = None
    attempts: int | None = None
    retry_at: int | None = None
    revision: str | None = None
    bytes_from_hub: int | None = None
    bytes_from_peers: int | None = None
    uploads: int | None = None
    bytes_served: int | None = None
    serves_peers: bool | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string"},
            "state": _STATE_ENUM,
            "status": {**_STATE_ENUM, "description": "alias of state"},
            "progress": {
                "type": ["object", "null"],
                "properties": {"bytes": _BYTES, "total": _BYTES},
            },
            "error": {"type": ["string", "null"]},
            "format": {"type": ["string", "null"]},
            "size_bytes": _BYTES,
            "servable": {
                "type": ["boolean", "null"],
                "description": "one of the node's runtimes serves it (default true)",
            },
            "attempts": {**_BYTES, "description": "failed tries in a row"},
            "retry_at": {**_BYTES, "description": "the next automatic try (unix seconds)"},
            "revision": {
                "type": ["string", "null"],
                "description": "commit the node downloaded the model at (peers must match)",
            },
            "bytes_from_hub": {**_BYTES, "description": "bytes of its download from the hub"},
            "bytes_from_peers": {**_BYTES, "description": "bytes of its download from peers"},
            "uploads": {**_BYTES, "description": "transfers to other nodes in progress"},
            "bytes_served": {**_BYTES, "description": "bytes served to other nodes"},
            "serves_peers": {
                "type": ["boolean", "null"],
                "description": "false: the node serves no peers (never listed as one)",
            },
        },
    }
    LIST_SCHEMA: ClassVar[dict[str, Any]] = {
        "type": ["array", "null"],
        "description": "A node's models; a bare string is a ready model",
        "items": {"anyOf": [{"type": "string"}, _ref("ModelReport")]},
    }

    def to_dict(self) -> dict[str, Any]:
        """The wire (and stored) form: ``id`` and ``state``, then only the fields known."""
        data: dict[str, Any] = {"id": self.id, "state": self.state}
        if self.progress is not None:
            data["progress"] = {"bytes": self.progress[0], "total": self.progress[1]}
        for name in _OPTIONAL_FIELDS:
            if (value := getattr(self, name)) is not None:
                data[name] = value
        return data


#: Per-model transfer counters of a report (hub vs. peers, uploads to peers).
PEER_COUNTERS = ("bytes_from_hub", "bytes_from_peers", "uploads", "bytes_served")
# The fields of a report's wire form that are left out when unknown, in their order.
_OPTIONAL_FIELDS = (
    "error", "format", "size_bytes", "servable", "attempts", "retry_at", "revision",
    *PEER_COUNTERS, "serves_peers",
)  # fmt: skip


def transfer_totals(models: list[dict[str, Any]]) -> dict[str, int]:
    """A node's per-model :data:`PEER_COUNTERS` summed (its ``transfer`` in the node's status
    and in ``GET /v0/nodes``)."""
    totals = dict.fromkeys(PEER_COUNTERS, 0)
    for report in models:
        for name in PEER_COUNTERS:
            totals[name] += int(report.get(name) or 0)
    return totals


def parse_model_reports(value: Any) -> list[dict[str, Any]]:
    """Validate a node's ``models`` list into the wire form of :class:`ModelReport`, one per id
    (the last one wins). ``status`` is accepted for ``state``; a bare string means a ready
    model.

    Builds the dicts directly, without a :class:`ModelReport` in between: this runs for every
    model of every heartbeat.

    Raises:
        ApiError: 400 naming the bad field (``invalid_model_id`` for an id).
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("models must be a list")
    reports: dict[str, dict[str, Any]] = {}
    for item in value:
        if isinstance(item, str):
            item = {"id": item, "state": _READY}
        if not isinstance(item, dict):
            raise _bad("each entry of models must be an object")
        model_id = _model_id(item.get("id"), "each model needs a string id")
        state = item.get("state", item.get("status", _READY))
        if state not in MODEL_STATES:
            raise _bad(f"model state must be one of {', '.join(MODEL_STATES)}")
        report: dict[str, Any] = {"id": model_id, "state": state}
        progress = item.get("progress")
        if progress is not None:
            if not isinstance(progress, dict):
                raise _bad("progress must be an object {bytes, total}")
            report["progress"] = {
                "bytes": _optional_int(progress.get("bytes"), "progress.bytes"),
                "total": _optional_int(progress.get("total"), "progress.total"),
            }
        for name in ("error", "format", "revision"):
            if (text := _optional_str(item.get(name), name)) is not None:
                report[name] = text
        if (size := _optional_int(item.get("size_bytes"), "size_bytes")) is not None:
            report["size_bytes"] = size
        for name in ("servable", "serves_peers"):
            if (flag := _optional_bool(item.get(name), name)) is not None:
                report[name] = flag
        for name in ("attempts", "retry_at", *PEER_COUNTERS):
            if (number := _optional_int(item.get(name), name)) is not None:
                report[name] = number
        reports[model_id] = report
    return list(reports.values())
