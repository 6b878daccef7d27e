"""Manifests: the files of a registered model, the peers a node may fetch them from, the
reports of peers that served bad bytes, and the router's approval of a node.

Apart because the manifest is the router's description of a model that a node reads to
download it, a contract of its own beside the node's reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from llmlb.protocol.fields import (
    _NODE_ID,
    _STRINGS,
    _bad,
    _model_id,
    _node_secret_schema,
    _optional_str,
    _ref,
    validate_node_id,
    validate_node_secret,
)


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
            "node_secret": _node_secret_schema(
                " of the reporter (409 node_id_conflict otherwise)"
            ),
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
        model_id = _model_id(body.get("model_id"), "model_id must be a string")
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
