"""A small blocking client of the router's admin API, shared by the CLI subcommands."""

from __future__ import annotations

import argparse
import functools
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import orjson

from llmlb import config


class ApiClientError(Exception):
    """A failed call: HTTP error from the router, or the router could not be reached.

    Attributes:
        status: HTTP status, or ``None`` when nothing answered.
        code: the error body's ``code`` (``unreachable`` when nothing answered).
        message: one readable sentence.
    """

    def __init__(self, status: int | None, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status else ""
        return f"{self.message} ({where}{self.code})"


class ApiClient:
    """Talk JSON to the router with a bearer key.

    Args:
        base_url: the router, e.g. ``http://127.0.0.1:8080``.
        api_key: bearer key, or ``None``.
        timeout: seconds per request.
    """

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; returns the decoded JSON answer (``None`` for an empty one).

        Raises:
            ApiClientError: non-2xx answer, or no answer at all.
        """
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(exc) from None
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiClientError(
                None, "unreachable", f"cannot reach the router at {self.base_url}: {reason}"
            ) from None
        return orjson.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        """``GET path``."""
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        """``POST path`` with a JSON body."""
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        """``DELETE path``."""
        return self.request("DELETE", path)


def _http_error(exc: urllib.error.HTTPError) -> ApiClientError:
    raw = exc.read()
    try:
        error = orjson.loads(raw)["error"]
        return ApiClientError(exc.code, str(error["code"]), str(error["message"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = raw.decode(errors="replace").strip()[:200] or exc.reason
        return ApiClientError(exc.code, "http_error", str(text))


def path_segment(value: str) -> str:
    """Quote one path segment (``/`` included) for a URL."""
    return quote(value, safe="")


def add_client_arguments(
    parser: argparse.ArgumentParser, key_help: str = "admin key (default $LLMLB_ADMIN_KEY)"
) -> None:
    """Add ``--router`` and ``--api-key`` with their documented defaults (``key_help``: the
    key's, for a command whose key is not the admin key)."""
    parser.add_argument(
        "--router",
        default=None,
        help="router URL (default $LLMLB_ROUTER_URL or http://127.0.0.1:8080)",
    )
    parser.add_argument("--api-key", default=None, help=key_help)


def client_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    **defaults: object,
) -> argparse.ArgumentParser:
    """A subcommand that talks to the router: ``--router``/``--api-key`` added and ``func``
    (with ``defaults``) set; its own arguments are added on the parser it returns. An
    :class:`ApiClientError` ``func`` raises is one line on stderr and exit code 1
    (:func:`report_error`)."""
    parser = sub.add_parser(name, help=help)
    add_client_arguments(parser)
    parser.set_defaults(func=_reporting(func), **defaults)
    return parser


def _reporting(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``func``, with an :class:`ApiClientError` it raises reported (exit code 1)."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ApiClientError as exc:
            return report_error(exc)

    return run


def client_from_args(args: argparse.Namespace) -> ApiClient:
    """An :class:`ApiClient` from ``--router``/``--api-key`` or their env defaults."""
    return ApiClient(args.router or config.router_url(), args.api_key or config.admin_key())


def delete_and_say(args: argparse.Namespace, path: str, done: str) -> int:
    """``DELETE path`` on the router; print ``done`` (exit 0) or the error (exit 1)."""
    try:
        client_from_args(args).delete(path)
    except ApiClientError as exc:
        return report_error(exc)
    print(done)
    return 0


def report_error(exc: ApiClientError) -> int:
    """Print ``error: …`` on one line to stderr; returns exit code 1."""
    print(f"error: {exc}", file=sys.stderr)
    return 1
