"""The download allowlist: which hosts a node fetches model bytes from (and sends its token to)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable


def host_allowed(url: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether ``url`` is http(s) on an allowlisted host (``*.example.com`` = subdomains)."""
    parsed = urllib.parse.urlparse(url)
    host = (parsed.hostname or "").lower().rstrip(".")
    if parsed.scheme not in ("http", "https") or not host:
        return False
    for pattern in allowed_hosts:
        pattern = pattern.lower().strip().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


def no_proxy_entries(allowed_hosts: Iterable[str]) -> str:
    """The allowlist as a ``NO_PROXY`` value for the transfer worker's guard.

    ``*.example.com`` becomes ``.example.com``. ``NO_PROXY`` matching also admits subdomains
    of a plain entry, so the guard inside a transfer is that much looser than
    :func:`host_allowed`, which every probe and redirect hop resolved before it passes.
    """
    entries = []
    for pattern in allowed_hosts:
        pattern = pattern.lower().strip().rstrip(".")
        if pattern:
            entries.append(pattern[1:] if pattern.startswith("*.") else pattern)
    return ",".join(dict.fromkeys(entries))


# A transfer's error names the URL it could not fetch (the guard refused a redirect to it).
_FAILED_URL = re.compile(r"for url \((\S+?)\)")


def refused_url(message: str, allowed_hosts: Iterable[str]) -> str | None:
    """The non-allowlisted URL a failed transfer's ``message`` names, if any."""
    for url in _FAILED_URL.findall(message):
        if not host_allowed(url, allowed_hosts):
            return url
    return None
