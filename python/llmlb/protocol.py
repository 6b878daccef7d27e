"""The node–router protocol: model states, manifests, model reports, registration and
heartbeat bodies and the router's answers to them, and the sync notification, written once
for the router, the node, the CLI and the OpenAPI document.

Conventions: ``parse`` validates a body that came over the wire from the other side and
raises :class:`~llmlb.errors.ApiError` 400 naming the bad field (the router's answer);
``from_dict`` reads a body from a trusted peer (the router's manifest, read by a node);
``to_dict`` gives the JSON-ready wire form. Each type's ``SCHEMA`` is its JSON Schema in the
router's OpenAPI document (:mod:`llmlb.router.api.openapi`).

Model reports, the ``models`` of registrations and heartbeats, travel and are stored as plain
dicts in their wire form: a node builds them with :meth:`ModelReport.to_dict`, the router
checks them with :func:`parse_model_reports` straight into that form (one pass per model per
heartbeat, no object in between).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar
from urllib.parse import urlsplit

from llmlb.errors import ApiError, invalid_model_id
from llmlb.model_storage import InvalidModelId, normalize_model_id

MAX_COUNT = 1_000_000  # bound on slots, active requests and attempts
MAX_BYTES = 1 << 60  # bound on sizes, progress and times


class ModelState(StrEnum):
    """The state a node reports for one model."""

    READY = "ready"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    FAILED = "failed"


#: Every state, in the order the CLI ranks a model across nodes (ready first).
MODEL_STATES: tuple[str, ...] = tuple(state.value for state in ModelState)
_READY = ModelState.READY.value
#: States of a model a node is still getting ready.
PENDING_STATES = frozenset({ModelState.DOWNLOADING, ModelState.LOADING})

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_NODE_SECRET = re.compile(r"[\x21-\x7e]{16,256}")

_STATE_ENUM = {"enum": list(MODEL_STATES)}
_BYTES = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_BYTES}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_NODE_SECRET_TEXT = "The node's own secret (16-256 printable ASCII"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


# --- validation of bodies from the other side ------------------------------------------


def _bad(message: str, code: str = "invalid_request_error") -> ApiError:
    return ApiError(400, code, message)


def _int(value: Any, name: str, minimum: int, maximum: int = MAX_COUNT) -> int:
    """An integer in ``[minimum, maximum]``; integral floats such as ``4.0`` count as integers."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _bad(f"{name} must be an integer in [{minimum}, {maximum}]")
    return value


def _optional_int(value: Any, name: str) -> int | None:
    return None if value is None else _int(value, name, 0, MAX_BYTES)


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    return value


def validate_node_id(value: Any) -> str:
    """A node id: 1-128 characters of ``[A-Za-z0-9._:-]``, starting alphanumeric.

    Raises:
        ApiError: 400 ``invalid_node_id``.
    """
    if not isinstance(value, str) or not _NODE_ID.fullmatch(value):
        raise _bad("node_id must be 1-128 characters of [A-Za-z0-9._:-]", "invalid_node_id")
    return value


def validate_node_secret(value: Any) -> str | None:
    """An optional ``node_secret``: 16-256 printable ASCII characters, no spaces."""
    if value is None:
        return None
    if not isinstance(value, str) or not _NODE_SECRET.fullmatch(value):
        raise _bad("node_secret must be 16-256 printable ASCII characters without spaces")
    return value


def validate_url(value: Any) -> str:
    """An ``http(s)://host[:port][/path]`` URL, without a trailing slash."""
    if not isinstance(value, str):
        raise _bad("url must be a string")
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise _bad("url has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise _bad("url must look like http://host:port")
    return value.rstrip("/")


def _runtimes(value: Any) -> list[str]:
    """A ``runtimes`` list (e.g. ``["llama.cpp"]``)."""
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise _bad("runtimes must be a list of strings")
    return value


# --- manifests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file a node downloads for a model.

    Attributes:
        filename: path in the repo.
        size_bytes: exact size.
        sha256: the LFS sha256 (lowercase hex); ``None`` only for small non-LFS files.
        url: ``<endpoint>/<repo>/resolve/<commit>/<filename>``.
        priority: download order, 0 = the primary file.
        optional: a node may skip it (e.g. another backend's file).
        backends: backends the file is for (``["metal"]``); ``[]`` means all.
        format: ``gguf``, ``safetensors``, ``json``, ``metal`` or ``other``.
    """

    filename: str
    size_bytes: int
    sha256: str | None
    url: str
    priority: int = 0
    optional: bool = False
    backends: list[str] = field(default_factory=list)
    format: str | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": [
            "filename",
            "format",
            "size_bytes",
            "sha256",
            "url",
            "priority",
            "optional",
            "backends",
        ],
        "properties": {
            "filename": {"type": "string"},
            "format": {"type": "string"},
            "size_bytes": {"type": "integer"},
            "sha256": {"type": ["string", "null"]},
            "url": {"type": "string"},
            "priority": {"type": "integer"},
            "optional": {"type": "boolean"},
            "backends": _STRINGS,
        },
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestFile:
        """Read one entry of a manifest's ``files``."""
        return cls(
            filename=str(data["filename"]),
            size_bytes=int(data["size_bytes"]),
            sha256=(str(data["sha256"]).lower() if data.get("sha256") else None),
            url=str(data["url"]),
            priority=int(data.get("priority") or 0),
            optional=bool(data.get("optional", False)),
            backends=list(data.get("backends") or ()),
            format=data.get("format"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "filename": self.filename,
            "format": self.format,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "url": self.url,
            "priority": self.priority,
            "optional": self.optional,
            "backends": list(self.backends),
        }


@dataclass(frozen=True, slots=True)
class PeerSource:
    """A node that can serve a model's files to other nodes (``GET /v0/peer/files/…``).

    Attributes:
        node_id: the serving node's id.
        url: its base URL.
        uploads: peer transfers it is serving now (how busy it is as an uploader).
    """

    node_id: str
    url: str
    uploads: int = 0

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["node_id", "url", "uploads"],
        "properties": {
            "node_id": {"type": "string"},
            "url": {"type": "string"},
            "uploads": {"type": "integer", "minimum": 0},
        },
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeerSource:
        """Read one entry of a manifest's ``peers``."""
        return cls(str(data["node_id"]), str(data["url"]), int(data.get("uploads") or 0))

    def to_dict(self) -> dict[str, Any]:
        """The wire form."""
        return {"node_id": self.node_id, "url": self.url, "uploads": self.uploads}


@dataclass(frozen=True, slots=True)
class PeerReport:
    """A ``POST /v0/peers/report`` body: a node tells the router a peer served bad bytes.

    A report counts only when it names its ``reporter``, an approved node, with that node's
    ``node_secret``; a peer leaves a node's own list on that node's report, and every list
    on reports from :data:`llmlb.router.control.peers.REPORT_QUORUM` distinct approved nodes.

    Attributes:
        model_id: the model whose file failed its check.
        node_id: the peer that served it.
        reason: what failed (``sha256 … != expected …``).
        reporter: the reporting node's id.
        node_secret: the reporting node's secret (proves it speaks for ``reporter``).
    """

    model_id: str
    node_id: str
    reason: str = ""
    reporter: str | None = None
    node_secret: str | None = field(default=None, repr=False)

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["model_id", "node_id"],
        "properties": {
            "model_id": {"type": "string"},
            "node_id": {"type": "string", "description": "the peer that served bad bytes"},
            "reason": {"type": ["string", "null"], "maxLength": 1000},
            "reporter": {
                "type": ["string", "null"],
                "description": "the reporting node's id; without one the report counts for "
                "nothing",
            },
            "node_secret": {
                "type": ["string", "null"],
                "description": f"{_NODE_SECRET_TEXT}) of the reporter (409 node_id_conflict "
                "otherwise)",
            },
            "counted": {
                "type": "boolean",
                "readOnly": True,
                "description": "answer only: whether the report counts (an approved reporter)",
            },
        },
    }

    @classmethod
    def parse(cls, body: dict[str, Any]) -> PeerReport:
        """Validate a report body.

        Raises:
            ApiError: 400 naming the bad field.
        """
        raw_id = body.get("model_id")
        if not isinstance(raw_id, str):
            raise _bad("model_id must be a string")
        try:
            model_id = normalize_model_id(raw_id)
        except InvalidModelId as exc:
            raise _bad(str(exc), "invalid_model_id") from None
        reason = _optional_str(body.get("reason"), "reason") or ""
        reporter = body.get("reporter")
        valid = isinstance(reporter, str) and _NODE_ID.fullmatch(reporter) is not None
        if reporter is not None and not valid:
            raise _bad("reporter must be 1-128 characters of [A-Za-z0-9._:-]", "invalid_node_id")
        return cls(
            model_id,
            validate_node_id(body.get("node_id")),
            reason[:1000],
            reporter,
            validate_node_secret(body.get("node_secret")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form (the secret included: a node's report to its router)."""
        data: dict[str, Any] = {
            "model_id": self.model_id,
            "node_id": self.node_id,
            "reason": self.reason,
        }
        if self.reporter is not None:
            data["reporter"] = self.reporter
            data["node_secret"] = self.node_secret
        return data


#: Field of the router's registration and heartbeat answers carrying the fleet credential:
#: the bearer token nodes present to each other on ``/v0/peer/*`` (never a router key).
#: Only approved nodes get it.
PEER_TOKEN_FIELD = "peer_token"

#: Field of the router's registration and heartbeat answers (and of ``GET /v0/nodes``) saying
#: whether the node is ``approved`` (serves clients, holds the peer token) or ``pending``
#: (waits for an admin: ``llmlb nodes approve ID``). Routers from before enrollment do not
#: send it.
APPROVAL_FIELD = "approval"


class Approval(StrEnum):
    """A node's standing with the router (:data:`APPROVAL_FIELD`)."""

    APPROVED = "approved"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class Manifest:
    """A registered model's manifest (``GET /v0/models/registry/{id}/manifest.json``).

    Attributes:
        model_id: the registered id.
        files: every file, in priority order.
        repo: ``Org/Name`` on the hub.
        revision: the pinned commit sha.
        format: ``gguf`` or ``safetensors``.
        quantization: from the GGUF filename (``Q4_K_M``), else ``None``.
        chat_template: the template registered with the model, if any.
        total_size_bytes: sum of all files' sizes (optional ones included).
        created_at: when the model was registered (ISO 8601).
        peers: nodes that hold the model ready at this revision and can serve its files to
            the node that asked (least busy first); only in answers to a node.
        peer_wait_s: set when no peer holds it yet but a seed node is fetching it from the
            hub: wait up to this many seconds for a peer (asking again), then use the hub.
    """

    model_id: str
    files: tuple[ManifestFile, ...]
    repo: str | None = None
    revision: str | None = None
    format: str | None = None
    chat_template: str | None = None
    quantization: str | None = None
    total_size_bytes: int | None = None
    created_at: str | None = None
    peers: tuple[PeerSource, ...] = ()
    peer_wait_s: float | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": [
            "model_id",
            "repo",
            "revision",
            "format",
            "files",
            "total_size_bytes",
            "created_at",
        ],
        "properties": {
            "model_id": {"type": "string"},
            "repo": {"type": "string"},
            "revision": {"type": "string"},
            "format": {"type": "string"},
            "quantization": {"type": ["string", "null"]},
            "chat_template": {"type": ["string", "null"]},
            "files": {"type": "array", "items": _ref("ManifestFile")},
            "total_size_bytes": {"type": "integer"},
            "created_at": {"type": "string"},
            "peers": {"type": "array", "items": _ref("PeerSource")},
            "peer_wait_s": {"type": ["number", "null"]},
        },
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Read the router's manifest JSON."""
        return cls(
            model_id=str(data["model_id"]),
            files=tuple(ManifestFile.from_dict(f) for f in data.get("files") or ()),
            repo=data.get("repo"),
            revision=data.get("revision"),
            format=data.get("format"),
            chat_template=data.get("chat_template") or None,
            quantization=data.get("quantization"),
            total_size_bytes=data.get("total_size_bytes"),
            created_at=data.get("created_at"),
            peers=tuple(PeerSource.from_dict(p) for p in data.get("peers") or ()),
            peer_wait_s=data.get("peer_wait_s"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "model_id": self.model_id,
            "repo": self.repo,
            "revision": self.revision,
            "format": self.format,
            "quantization": self.quantization,
            "chat_template": self.chat_template,
            "files": [f.to_dict() for f in self.files],
            "total_size_bytes": self.total_size_bytes,
            "created_at": self.created_at,
            **({"peers": [p.to_dict() for p in self.peers]} if self.peers else {}),
            **({"peer_wait_s": self.peer_wait_s} if self.peer_wait_s is not None else {}),
        }


# --- model reports -----------------------------------------------------------------------


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
        if self.error is not None:
            data["error"] = self.error
        if self.format is not None:
            data["format"] = self.format
        if self.size_bytes is not None:
            data["size_bytes"] = self.size_bytes
        if self.servable is not None:
            data["servable"] = self.servable
        if self.attempts is not None:
            data["attempts"] = self.attempts
        if self.retry_at is not None:
            data["retry_at"] = self.retry_at
        if self.revision is not None:
            data["revision"] = self.revision
        for name in PEER_COUNTERS:
            if (value := getattr(self, name)) is not None:
                data[name] = value
        if self.serves_peers is not None:
            data["serves_peers"] = self.serves_peers
        return data


#: Per-model transfer counters of a report (hub vs. peers, uploads to peers).
PEER_COUNTERS = ("bytes_from_hub", "bytes_from_peers", "uploads", "bytes_served")


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
        raw_id = item.get("id")
        if not isinstance(raw_id, str):
            raise _bad("each model needs a string id")
        try:
            model_id = normalize_model_id(raw_id)
        except InvalidModelId as exc:
            raise _bad(str(exc), "invalid_model_id") from None
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
        servable = item.get("servable")
        if servable is not None:
            if not isinstance(servable, bool):
                raise _bad("servable must be a boolean")
            report["servable"] = servable
        serves_peers = item.get("serves_peers")
        if serves_peers is not None:
            if not isinstance(serves_peers, bool):
                raise _bad("serves_peers must be a boolean")
            report["serves_peers"] = serves_peers
        for name in ("attempts", "retry_at", *PEER_COUNTERS):
            if (number := _optional_int(item.get(name), name)) is not None:
                report[name] = number
        reports[model_id] = report
    return list(reports.values())


# --- registration and heartbeat -----------------------------------------------------------


def _generated_id() -> str:
    return "node-" + secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class Registration:
    """A ``POST /v0/nodes`` body: a node introduces itself.

    Attributes:
        node_id: the node's stable id (the router makes one up when a body has none).
        url: where the router reaches the node.
        runtimes: the node's inference runtimes (``["llama.cpp"]``).
        gpu: ``{"backend": "metal" | "cuda" | "cpu", …}``.
        slots: requests the node serves at once.
        models: the node's :class:`ModelReport` dicts.
        node_secret: the node's own secret, binding ``node_id`` to it.
    """

    node_id: str
    url: str
    runtimes: list[str]
    gpu: dict[str, Any]
    slots: int
    models: list[dict[str, Any]]
    node_secret: str | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["url"],
        "properties": {
            "node_id": {"type": ["string", "null"], "description": "[A-Za-z0-9._:-], <= 128"},
            "url": {"type": "string", "description": "http(s)://host:port the router can reach"},
            "runtimes": _STRINGS,
            "gpu": {
                "type": ["object", "null"],
                "description": "`backend`: metal|cuda|cpu, and details",
            },
            "slots": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
            "models": _ref("ModelReports"),
            "node_secret": {
                "type": ["string", "null"],
                "description": f"{_NODE_SECRET_TEXT}): binds node_id to it; without one the "
                "id is bound to the bearer key",
            },
        },
    }

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Registration:
        """Validate a registration body.

        Raises:
            ApiError: 400 naming the bad field.
        """
        node_id = body.get("node_id")
        node_id = validate_node_id(node_id) if node_id is not None else _generated_id()
        runtimes = _runtimes(body.get("runtimes", []))
        gpu = body.get("gpu", {})
        if gpu is None:
            gpu = {}
        if not isinstance(gpu, dict):
            raise _bad("gpu must be an object")
        return cls(
            node_id=node_id,
            url=validate_url(body.get("url")),
            runtimes=runtimes,
            gpu=gpu,
            slots=_int(body.get("slots", 1), "slots", 1),
            models=parse_model_reports(body.get("models")),
            node_secret=validate_node_secret(body.get("node_secret")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "node_id": self.node_id,
            "url": self.url,
            "runtimes": list(self.runtimes),
            "gpu": self.gpu,
            "slots": self.slots,
            "models": self.models,
            "node_secret": self.node_secret,
        }


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A ``POST /v0/nodes/{id}/heartbeat`` body; ``None`` fields keep their stored value."""

    models: list[dict[str, Any]] | None
    active_requests: int
    slots: int | None
    runtimes: list[str] | None = None
    node_secret: str | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "models": _ref("ModelReports"),
            "active_requests": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_COUNT},
            "slots": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_COUNT},
            "runtimes": {**_STRINGS, "type": ["array", "null"]},
            "node_secret": {
                "type": ["string", "null"],
                "description": f"{_NODE_SECRET_TEXT}): the one it registered with (409 "
                "node_id_conflict otherwise)",
            },
        },
    }

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Heartbeat:
        """Validate a heartbeat body.

        Raises:
            ApiError: 400 naming the bad field.
        """
        models = body.get("models")
        slots = body.get("slots")
        active = body.get("active_requests")
        return cls(
            models=parse_model_reports(models) if models is not None else None,
            active_requests=_int(active, "active_requests", 0) if active is not None else 0,
            slots=_int(slots, "slots", 1) if slots is not None else None,
            runtimes=_runtimes(body["runtimes"]) if body.get("runtimes") is not None else None,
            node_secret=validate_node_secret(body.get("node_secret")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "models": self.models,
            "active_requests": self.active_requests,
            "slots": self.slots,
            "runtimes": self.runtimes,
            "node_secret": self.node_secret,
        }


_APPROVAL_SCHEMA: dict[str, Any] = {
    "enum": ["approved", "pending"],
    "description": "pending: waits for an admin (POST /v0/nodes/{node_id}/approve); "
    "no client traffic and no peer token until then",
}
_PEER_TOKEN_SCHEMA: dict[str, Any] = {
    "type": "string",
    "description": "fleet credential for /v0/peer/* (approved nodes only)",
}


def _answer_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class HeartbeatAnswer:
    """The router's answer to a heartbeat (200).

    Attributes:
        node_id: the id the node is registered under.
        heartbeat_interval_s: the heartbeat period the router asks for (``None``: keep
            the node's own).
        approval: :class:`Approval` (``None``: a router from before enrollment).
        peer_token: the fleet credential (:data:`PEER_TOKEN_FIELD`), approved nodes only.
    """

    node_id: str | None
    heartbeat_interval_s: float | None
    approval: str | None = None
    peer_token: str | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["node_id", "heartbeat_interval_s"],
        "properties": {
            "node_id": {"type": "string"},
            "heartbeat_interval_s": {"type": "number"},
            APPROVAL_FIELD: _APPROVAL_SCHEMA,
            PEER_TOKEN_FIELD: _PEER_TOKEN_SCHEMA,
        },
    }

    @staticmethod
    def _common(data: dict[str, Any]) -> dict[str, Any]:
        interval = data.get("heartbeat_interval_s")
        usable = isinstance(interval, int | float) and not isinstance(interval, bool)
        return {
            "node_id": _answer_str(data.get("node_id")),
            "heartbeat_interval_s": float(interval) if usable and interval else None,
            "approval": data.get(APPROVAL_FIELD)
            if isinstance(data.get(APPROVAL_FIELD), str)
            else None,
            "peer_token": _answer_str(data.get(PEER_TOKEN_FIELD)),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeartbeatAnswer:
        """Read the router's answer (a field of the wrong type reads as absent)."""
        return cls(**cls._common(data))

    def to_dict(self) -> dict[str, Any]:
        """The wire form (``approval`` and ``peer_token`` only when set)."""
        data: dict[str, Any] = {
            "node_id": self.node_id,
            "heartbeat_interval_s": self.heartbeat_interval_s,
        }
        if self.approval is not None:
            data[APPROVAL_FIELD] = self.approval
        if self.peer_token is not None:
            data[PEER_TOKEN_FIELD] = self.peer_token
        return data


@dataclass(frozen=True, slots=True)
class RegistrationAnswer(HeartbeatAnswer):
    """The router's answer to a registration (201): a :class:`HeartbeatAnswer` and the
    ``sync_token`` the router presents on ``POST /api/models/sync`` (and its proxy on
    forwarded requests)."""

    sync_token: str | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": [*HeartbeatAnswer.SCHEMA["required"], "sync_token"],
        "properties": {**HeartbeatAnswer.SCHEMA["properties"], "sync_token": {"type": "string"}},
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegistrationAnswer:
        """Read the router's answer (a field of the wrong type reads as absent)."""
        return cls(**cls._common(data), sync_token=_answer_str(data.get("sync_token")))

    def to_dict(self) -> dict[str, Any]:
        """The wire form."""
        data = HeartbeatAnswer.to_dict(self)
        return {"node_id": data.pop("node_id"), **data, "sync_token": self.sync_token}


class SyncAction(StrEnum):
    """What a sync notification asks of a node for the models it names."""

    REGISTER = "register"  # resolve the models (registered or changed)
    DELETE = "delete"  # remove them (when the node downloaded them)
    RETRY = "retry"  # resolve them again at once, failed ones included


_SYNC_ACTIONS = tuple(action.value for action in SyncAction)


@dataclass(frozen=True, slots=True)
class SyncNotice:
    """A ``POST /api/models/sync`` body: the router names models that changed.

    Attributes:
        models: normalised model ids.
        action: a :class:`SyncAction` value.
    """

    models: list[str]
    action: str = SyncAction.REGISTER.value

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["models"],
        "properties": {
            "models": {**_STRINGS, "description": "model ids"},
            "action": {"enum": list(_SYNC_ACTIONS), "default": SyncAction.REGISTER.value},
        },
    }

    @classmethod
    def parse(cls, body: dict[str, Any]) -> SyncNotice:
        """Validate a notification body (ids normalised).

        Raises:
            ApiError: 400 naming the bad field (``invalid_model_id`` for a bad id).
        """
        models = body.get("models")
        action = body.get("action", SyncAction.REGISTER.value)
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise _bad("'models' must be a list of ids")
        ids: list[str] = []
        for model_id in models:
            try:
                ids.append(normalize_model_id(model_id))
            except InvalidModelId as exc:
                raise invalid_model_id(exc, "models") from None
        if action not in _SYNC_ACTIONS:
            raise _bad("'action' must be 'register', 'delete' or 'retry'")
        return cls(models=ids, action=str(action))

    def to_dict(self) -> dict[str, Any]:
        """The wire form."""
        return {"models": list(self.models), "action": self.action}


#: The protocol's schemas for the router's OpenAPI ``components.schemas``.
SCHEMAS: dict[str, dict[str, Any]] = {
    "ManifestFile": ManifestFile.SCHEMA,
    "Manifest": Manifest.SCHEMA,
    "PeerSource": PeerSource.SCHEMA,
    "PeerReport": PeerReport.SCHEMA,
    "ModelReport": ModelReport.SCHEMA,
    "ModelReports": ModelReport.LIST_SCHEMA,
    "NodeRegistration": Registration.SCHEMA,
    "Heartbeat": Heartbeat.SCHEMA,
    "NodeRegistered": RegistrationAnswer.SCHEMA,
    "HeartbeatAck": HeartbeatAnswer.SCHEMA,
    "SyncNotice": SyncNotice.SCHEMA,
}
