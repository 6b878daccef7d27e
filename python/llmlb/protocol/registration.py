"""Registration and heartbeat: the node's bodies and the router's answers to them.

Apart because they are the node's session with a router (identity, secret, peer token,
approval), not a description of models.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

from llmlb.protocol.fields import (
    _STRINGS,
    MAX_COUNT,
    _bad,
    _int,
    _node_secret_schema,
    _ref,
    _runtimes,
    validate_node_id,
    validate_node_secret,
    validate_url,
)
from llmlb.protocol.manifests import APPROVAL_FIELD, PEER_TOKEN_FIELD
from llmlb.protocol.reports import parse_model_reports


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
            "node_secret": _node_secret_schema(
                ": binds node_id to it; without one the id is bound to the bearer key"
            ),
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
            "node_secret": _node_secret_schema(
                ": the one it registered with (409 node_id_conflict otherwise)"
            ),
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
