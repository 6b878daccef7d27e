"""Typed errors shared by router, node and CLI, and the OpenAI error body they map to.

Every error a caller may handle lives here, grouped: the HTTP error (:class:`ApiError`) and
the constructors of the errors that more than one route answers (one function per code, so
one code has one message), the model id's error, the hub's errors, and the download's.
Errors private to one module (a retry signal, a parser's internal failure) stay there.
"""

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


def invalid_api_key(credential: str) -> ApiError:
    """401 ``invalid_api_key``: the request carries no ``credential`` (the route's: an API key,
    the node's sync token, the fleet's peer token), or a wrong one."""
    return ApiError(401, "invalid_api_key", f"missing or invalid {credential}")


def model_not_found(model_id: str) -> ApiError:
    """404 ``model_not_found``: the router, or a node, knows no model ``model_id``."""
    return ApiError(404, "model_not_found", f"model '{model_id}' not found")


def model_already_registered(model_id: str) -> ApiError:
    """409 ``model_exists``: registering ``model_id`` a second time."""
    return ApiError(409, "model_exists", f"model {model_id} is already registered")


def key_not_found(key_id: int | str) -> ApiError:
    """404 ``key_not_found``: no API key with id ``key_id``."""
    return ApiError(404, "key_not_found", f"no key with id {key_id}")


def invalid_model_id(exc: Exception, param: str | None = None) -> ApiError:
    """400 ``invalid_model_id`` carrying the broken rule (``str(exc)``) and the request
    field the id came from, when known."""
    return ApiError(400, "invalid_model_id", str(exc), param=param)


def request_too_large(limit: int) -> ApiError:
    """413 ``request_too_large`` for a body over ``limit`` bytes."""
    return ApiError(413, "request_too_large", f"request body exceeds {limit} bytes")


class AmbiguousArtifactsError(ApiError):
    """400 ``ambiguous_artifacts`` answered to a registration; the error object also lists
    ``choices`` (the filenames a ``filename`` hint may name)."""

    def __init__(self, message: str, choices: list[str]):
        super().__init__(
            400, "ambiguous_artifacts", f"{message} (choose a filename: {', '.join(choices)})"
        )
        self.choices = choices

    def body(self) -> bytes:
        """The error body with ``choices`` added."""
        data = orjson.loads(super().body())
        data["error"]["choices"] = self.choices
        return orjson.dumps(data)


class ContextLengthExceeded(ApiError):
    """A prompt and the answer it asks for do not fit the model's context (400
    ``context_length_exceeded``), raised before any byte is sent.

    Worded as OpenAI words it, which is what clients (LiteLLM, LangChain) recognise; the
    Anthropic routes answer :meth:`anthropic_message` instead. ``param`` is the prompt's
    field when the prompt alone leaves no room for an answer, else the answer's length.

    Args:
        limit: the context, in tokens.
        prompt: the prompt's tokens (the longest prompt's, for several).
        completion: the answer's tokens asked for (``max_tokens``), ``None`` when not asked.
        chat: a chat request (its prompt is ``messages``), else a completion (``prompt``).
        prompt_param, completion_param: the request's names of the two fields, when they
            are not chat's or completions' (the Responses API: ``input``,
            ``max_output_tokens``).
    """

    def __init__(
        self,
        limit: int,
        prompt: int,
        completion: int | None,
        *,
        chat: bool = True,
        prompt_param: str | None = None,
        completion_param: str = "max_tokens",
    ):
        self.limit, self.prompt, self.completion, self.chat = limit, prompt, completion, chat
        self.prompt_param = prompt_param or ("messages" if chat else "prompt")
        self.completion_param = completion_param
        requested = prompt + (completion or 0)
        if chat and completion is None:
            told = (
                f"However, your messages resulted in {prompt} tokens. Please reduce the "
                "length of the messages."
            )
        elif chat:
            told = (
                f"However, you requested {requested} tokens ({prompt} in the messages, "
                f"{completion} in the completion). Please reduce the length of the messages or "
                "completion."
            )
        elif completion is None:
            told = f"however your prompt resulted in {prompt} tokens. Please reduce your prompt."
        else:
            told = (
                f"however you requested {requested} tokens ({prompt} in your prompt; "
                f"{completion} for the completion). Please reduce your prompt; or completion "
                "length."
            )
        head = f"This model's maximum context length is {limit} tokens" + (
            ". " if chat else ", "
        )
        # openai's SDKs put only the message in the exception's text, where LangChain looks
        # for the code to raise its ContextOverflowError
        message = f"{head}{told} (code: context_length_exceeded)"
        param = self.prompt_param if prompt >= limit else completion_param
        super().__init__(400, "context_length_exceeded", message, param=param)

    def renamed(self, prompt_param: str, completion_param: str) -> ContextLengthExceeded:
        """The same error for a dialect that names the two fields otherwise."""
        return ContextLengthExceeded(
            self.limit,
            self.prompt,
            self.completion,
            chat=self.chat,
            prompt_param=prompt_param,
            completion_param=completion_param,
        )

    def anthropic_message(self) -> str:
        """Anthropic's wording (``prompt is too long: …``, which Claude Code and LiteLLM
        recognise; the prompt's maximum leaves one token to answer)."""
        if self.prompt >= self.limit or self.completion is None:
            return f"prompt is too long: {self.prompt} tokens > {self.limit - 1} maximum"
        return (
            f"input length and `max_tokens` exceed context limit: {self.prompt} + "
            f"{self.completion} > {self.limit}, decrease input length or `max_tokens` and try "
            "again"
        )


class InvalidModelId(ValueError):
    """A model id breaks the id rules (:func:`llmlb.model_storage.normalize_model_id`); the
    message names the rule. HTTP routes answer it as 400 ``invalid_model_id``."""


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


class IntegrityCheckFailed(DownloadError):
    """A downloaded file failed its size or SHA-256 check twice (not the database's
    constraint error, :class:`llmlb.router.db.IntegrityError`)."""


class ModelNotRegistered(DownloadError):
    """The router has no model with this id (its manifest answered 404)."""


class RouterUnavailable(DownloadError):
    """The router could not be asked for a model's manifest."""


class DownloadCancelled(DownloadError):
    """The download was cancelled (node shutting down, the model deleted)."""
