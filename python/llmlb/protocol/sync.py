"""The sync notification: the body of ``POST /api/models/sync`` the router sends a node
when models are registered or removed.

Apart because it flows the other way (router to node) from every other shape here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from llmlb.errors import invalid_model_id
from llmlb.model_storage import InvalidModelId, normalize_model_id
from llmlb.protocol.fields import _STRINGS, _bad


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
