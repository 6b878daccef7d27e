"""Typed errors shared by router, node and CLI, and the OpenAI error body they map to."""

from __future__ import annotations

import orjson

# HTTP status -> OpenAI error "type".
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
}


def error_body(
    message: str,
    code: str,
    status: int,
    error_type: str | None = None,
    param: str | None = None,
) -> bytes:
    """Serialise ``{"error": {"message", "type", "code", "param"}}`` for ``status``.

    ``param`` (the request field at fault, as OpenAI names it) is present only when known.
    """
    kind = error_type or _ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    error: dict[str, str] = {"message": message, "type": kind, "code": code}
    if param is not None:
        error["param"] = param
    return orjson.dumps({"error": error})


class LlmlbError(Exception):
    """Base class of llmlb's errors."""


class ApiError(LlmlbError):
    """An error that an HTTP handler turns into an OpenAI-shaped response.

    Args:
        status: HTTP status code.
        code: stable machine-readable code, e.g. ``model_not_found``.
        message: one readable sentence.
        retry_after: seconds for a ``Retry-After`` header (429/503).
        param: the request field at fault (``error.param`` in the body), when one is.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.param = param

    def body(self) -> bytes:
        """The JSON error body."""
        return error_body(self.message, self.code, self.status, param=self.param)

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` when set)."""
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, int(round(self.retry_after))))}


class HubError(LlmlbError):
    """Base class of failures talking to the hub while registering a model."""


class HubRepoNotFound(HubError):
    """The repository or revision does not exist on the hub (404 ``hub_repo_not_found``)."""


class HubUnavailable(HubError):
    """The hub is unreachable or answered 5xx (502 ``upstream_error``)."""


class AmbiguousArtifacts(HubError):
    """Several candidate artifacts and no hint to choose (400 ``ambiguous_artifacts``).

    Attributes:
        choices: the filenames a ``filename`` hint may name.
    """

    def __init__(self, message: str, choices: list[str]):
        super().__init__(message)
        self.choices = choices


class NoSupportedArtifacts(HubError):
    """The repository holds no GGUF or safetensors model (400 ``no_supported_artifacts``)."""


class DownloadError(LlmlbError):
    """A node could not download a model; ``str(exc)`` names the model and the reason."""


class HostNotAllowed(DownloadError):
    """A file URL (or a redirect) points at a host that is not on the download allowlist."""


class InsufficientDiskSpace(DownloadError):
    """The store's file system has less free space than the files still to fetch."""


class IntegrityError(DownloadError):
    """A downloaded file failed its size or SHA-256 check twice."""


class ModelNotRegistered(DownloadError):
    """The router has no model with this id (its manifest answered 404)."""


class RouterUnavailable(DownloadError):
    """The router could not be asked for a model's manifest."""


class DownloadCancelled(DownloadError):
    """The download was cancelled (node shutting down, the model deleted)."""
