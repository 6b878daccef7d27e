"""Reading a hub repository into a pinned model manifest (used by the router at registration).

:func:`fetch_repo_manifest` asks the hub (through ``huggingface_hub``, so ``HF_ENDPOINT`` and
mirrors work) for the repo's files with their LFS metadata, pins the revision to its commit sha,
picks the model's artifacts (:mod:`llmlb.hub.artifacts`) and returns a :class:`RepoManifest`
whose URLs point at ``<endpoint>/<repo>/resolve/<commit>/<file>``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from urllib.parse import quote, urlparse

import orjson
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from llmlb import config
from llmlb.errors import HubRepoNotFound, HubUnavailable, NoSupportedArtifacts
from llmlb.hub.artifacts import RemoteFile, file_format, select_artifacts
from llmlb.model_storage import InvalidModelId
from llmlb.protocol import ManifestFile

logger = logging.getLogger(__name__)

#: Seconds to wait for the hub on each metadata call.
HUB_TIMEOUT_S = 30.0
_HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_URL_KINDS = ("tree", "blob", "resolve")
_REPO_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of the HTTP stacks huggingface_hub may use."""
    found: list[type[BaseException]] = [OSError, OfflineModeIsEnabled]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


@dataclass
class RepoManifest:
    """A model's files in one hub repo, pinned to a commit.

    Attributes:
        repo: ``Org/Name`` as the hub spells it.
        revision: the 40-hex commit sha.
        format: ``gguf`` or ``safetensors``.
        filename: the primary file.
        quantization: from the GGUF filename (``Q4_K_M``), else ``None``.
        chat_template: always ``None`` here (the router may set one).
        files: every file, in priority order (the manifest's files, :mod:`llmlb.protocol`).
        total_size_bytes: sum of all files' sizes (optional ones included).
    """

    repo: str
    revision: str
    format: str
    filename: str
    quantization: str | None
    chat_template: str | None
    files: list[ManifestFile]
    total_size_bytes: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {**asdict(self), "files": [f.to_dict() for f in self.files]}


def parse_repo_ref(repo_or_url: str) -> tuple[str, str | None, str | None]:
    """Split ``Org/Name`` or a hub URL into ``(repo_id, revision, filename)``.

    Accepts ``https://huggingface.co/Org/Name``, ``.../tree/REV[/dir]``,
    ``.../blob/REV/FILE`` and ``.../resolve/REV/FILE`` (any host, for mirrors), with or without
    the scheme for the hub's own hosts.

    Raises:
        InvalidModelId: not a two-segment repo id or hub URL.
    """
    text = repo_or_url.strip()
    revision = filename = None
    lowered = text.lower()
    if lowered.startswith(tuple(f"{h}/" for h in _HUB_HOSTS)):
        text = f"https://{text}"
    if "://" in text:
        parsed = urlparse(text)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidModelId(f"not a hub URL: {repo_or_url!r}")
        parts = [p for p in parsed.path.split("/") if p]
        if parts[:1] == ["models"]:
            parts = parts[1:]
        if len(parts) < 2:
            raise InvalidModelId(f"hub URL names no repository: {repo_or_url!r}")
        rest = parts[2:]
        if rest:
            if rest[0] not in _URL_KINDS or len(rest) < 2:
                raise InvalidModelId(f"unsupported hub URL: {repo_or_url!r}")
            revision = rest[1]
            if rest[0] in ("blob", "resolve"):
                if len(rest) < 3:
                    raise InvalidModelId(f"hub URL names no file: {repo_or_url!r}")
                filename = "/".join(rest[2:])
        text = f"{parts[0]}/{parts[1]}"
    segments = text.split("/")
    if len(segments) != 2 or not all(_valid_segment(s) for s in segments):
        raise InvalidModelId(f"invalid hub repository {repo_or_url!r}: expected 'Org/Name'")
    return text, revision, filename


def _valid_segment(segment: str) -> bool:
    return (
        bool(_REPO_SEGMENT.match(segment))
        and "--" not in segment
        and ".." not in segment
        and not segment.endswith((".", "-", ".git"))
    )


def fetch_repo_manifest(
    repo_or_url: str,
    *,
    revision: str = "main",
    filename: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> RepoManifest:
    """Read a hub repo and build the manifest of the model it holds (blocking).

    Args:
        repo_or_url: ``Org/Name`` or a hub URL; a URL's ``/tree|blob|resolve/REV[/FILE]`` part
            supplies the revision and filename unless those are given explicitly.
        revision: branch, tag or commit; pinned to the commit sha in the result.
        filename: hint choosing among several artifacts (see :mod:`llmlb.hub.artifacts`).
        endpoint: hub base URL; default ``HF_ENDPOINT`` (``https://huggingface.co``).
        token: hub token; ``None`` sends no token at all (the environment is not consulted).

    Returns:
        The pinned :class:`RepoManifest`.

    Raises:
        InvalidModelId: malformed repo id or URL.
        HubRepoNotFound: no such repo, revision, or no access to it.
        HubUnavailable: the hub is unreachable, times out or answers 5xx/429.
        AmbiguousArtifacts: several models and no ``filename`` hint.
        NoSupportedArtifacts: no GGUF or complete safetensors model (or the hint names none).
    """
    repo_id, url_revision, url_filename = parse_repo_ref(repo_or_url)
    if url_revision and revision == "main":
        revision = url_revision
    if url_filename and not filename:
        filename = url_filename
    base = (endpoint or config.hf_endpoint()).rstrip("/")
    api = HfApi(endpoint=base, token=token or False, library_name="llmlb")
    with _hub_errors(repo_id, revision):
        info = api.model_info(
            repo_id, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT_S
        )
    commit = info.sha
    if not commit or not _SHA.match(commit):
        raise HubUnavailable(f"the hub gave no commit sha for {repo_id}@{revision}")
    canonical = info.id or repo_id
    listing = [
        RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    ]
    by_path = {f.path: f for f in listing}

    def resolve_url(path: str) -> str:
        return f"{base}/{canonical}/resolve/{commit}/{quote(path)}"

    def read_json(path: str) -> object:
        with _hub_errors(repo_id, commit, missing=NoSupportedArtifacts):
            response = get_session().get(
                resolve_url(path),
                timeout=HUB_TIMEOUT_S,
                headers=build_hf_headers(token=token or False, library_name="llmlb"),
            )
            hf_raise_for_status(response)
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise NoSupportedArtifacts(f"{path} in {repo_id} is not valid JSON: {exc}") from None

    selection = select_artifacts(listing, filename, read_json)
    entries: list[tuple[str, bool, list[str]]] = [
        (path, False, []) for path in selection.required
    ]
    entries += [(path, True, backends) for path, backends in selection.optional]
    files = [
        ManifestFile(
            filename=path,
            format=file_format(path),
            size_bytes=by_path[path].size,
            sha256=by_path[path].sha256,
            url=resolve_url(path),
            priority=priority,
            optional=optional,
            backends=list(backends),
        )
        for priority, (path, optional, backends) in enumerate(entries)
    ]
    logger.info(
        "hub repo %s@%s pinned to %s: %s (%d files)",
        canonical,
        revision,
        commit,
        selection.primary,
        len(files),
    )
    return RepoManifest(
        repo=canonical,
        revision=commit,
        format=selection.format,
        filename=selection.primary,
        quantization=selection.quantization,
        chat_template=None,
        files=files,
        total_size_bytes=sum(f.size_bytes for f in files),
    )


@contextmanager
def _hub_errors(
    repo_id: str, revision: str, missing: type[Exception] = HubRepoNotFound
) -> Iterator[None]:
    """Translate huggingface_hub and transport exceptions into llmlb's typed hub errors.

    Messages name the repo and revision, never the token.
    """
    where = f"{repo_id}@{revision}"
    try:
        yield
    except HFValidationError as exc:
        raise InvalidModelId(str(exc)) from None
    except RevisionNotFoundError:
        raise HubRepoNotFound(f"revision {revision!r} not found in {repo_id}") from None
    except GatedRepoError:
        raise HubRepoNotFound(f"{repo_id} is gated and the token has no access") from None
    except RepositoryNotFoundError:
        raise HubRepoNotFound(f"hub repository {repo_id} not found") from None
    except RemoteEntryNotFoundError:
        raise missing(f"file not found in {where}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403, 404):
            raise missing(f"{where}: the hub answered {status}") from None
        raise HubUnavailable(f"hub error for {where}: HTTP {status}") from None
    except _TRANSPORT_ERRORS as exc:
        raise HubUnavailable(f"hub unreachable for {where}: {type(exc).__name__}") from None
