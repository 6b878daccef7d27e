"""The node's blocking requests to the router: a model's manifest (used by downloads and
``llmlb pull``), and reports of peers that served bad bytes (the registration and heartbeat
loop is :mod:`llmlb.node.fleet.sync`).

``router_url`` may name several routers of one fleet (``URL1,URL2``, sharing one database):
each is asked in turn until one answers (:func:`first_router`).
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import orjson

from llmlb import config
from llmlb.errors import ModelNotRegistered, RouterUnavailable
from llmlb.protocol import Manifest, PeerReport

T = TypeVar("T")


def first_router(router_url: str, call: Callable[[str], T]) -> T:
    """``call(url)`` for each router of ``router_url`` (``URL1,URL2``) in turn, until one does
    not raise :class:`RouterUnavailable` (other errors, such as a 404, are answers).

    Raises:
        RouterUnavailable: the last router's failure, when none answered.
    """
    urls = config.router_urls(router_url)
    for url in urls[:-1]:
        try:
            return call(url)
        except RouterUnavailable:
            continue
    return call(urls[-1] if urls else router_url)


def fetch_manifest(
    router_url: str,
    api_key: str | None,
    model_id: str,
    timeout: float = 10.0,
    node_id: str | None = None,
) -> Manifest:
    """Ask the router for ``model_id``'s manifest (blocking).

    With ``node_id`` (a registered node asking), the answer also lists the peers that can
    serve the model's files (``peers``), or says to wait for one (``peer_wait_s``).

    Raises:
        ModelNotRegistered: the router answered 404.
        RouterUnavailable: the router is unreachable or answered another error.
    """
    if "," in router_url:
        return first_router(
            router_url, lambda url: fetch_manifest(url, api_key, model_id, timeout, node_id)
        )
    quoted = urllib.parse.quote(model_id, safe="")
    url = f"{router_url.rstrip('/')}/v0/models/registry/{quoted}/manifest.json"
    if node_id:
        url += "?" + urllib.parse.urlencode({"node_id": node_id})
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as resp:
            return Manifest.from_dict(orjson.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise ModelNotRegistered(
                f"model {model_id!r} is not registered with the router"
            ) from None
        raise RouterUnavailable(
            f"router answered {exc.code} for the manifest of {model_id!r}: {_error_text(exc)}"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise RouterUnavailable(f"cannot fetch the manifest of {model_id!r}: {exc}") from None


def report_peer(
    router_url: str, api_key: str | None, report: PeerReport, timeout: float = 10.0
) -> None:
    """Tell the router a peer served bytes that failed their check (blocking).

    Raises:
        RouterUnavailable: the router is unreachable or refused the report.
    """
    if "," in router_url:
        return first_router(router_url, lambda url: report_peer(url, api_key, report, timeout))
    url = f"{router_url.rstrip('/')}/v0/peers/report"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url, data=orjson.dumps(report.to_dict()), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise RouterUnavailable(f"router answered {exc.code} to a peer report") from None
    except OSError as exc:
        raise RouterUnavailable(f"cannot report peer {report.node_id}: {exc}") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return orjson.loads(exc.read())["error"]["message"]
    except Exception:  # noqa: BLE001 - best effort
        return exc.reason if isinstance(exc.reason, str) else ""
