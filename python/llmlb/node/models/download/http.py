"""Blocking HTTP for probes and single-stream GETs: redirects followed by hand, each hop
checked against the allowlist, the hub token only sent to allowlisted hosts."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from llmlb.errors import DownloadError, HostNotAllowed
from llmlb.node.models.download.allowlist import host_allowed, refused_url
from llmlb.node.models.download.signals import Transient


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102, ANN001
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True, slots=True)
class Probe:
    """What a one-byte range GET told of a file."""

    url: str  # after redirects
    size: int | None
    ranges: bool


class Http:
    """Blocking HTTP for probes and single-stream GETs, enforcing the allowlist."""

    def __init__(self, allowed_hosts: list[str], token: str | None, timeout: float):
        self.allowed_hosts = allowed_hosts
        self.token = token
        self.timeout = timeout

    def headers_for(self, url: str) -> dict[str, str]:
        """Auth headers for ``url``: the hub token only ever goes to allowlisted hosts."""
        if self.token and host_allowed(url, self.allowed_hosts):
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def refused(self, message: str) -> str | None:
        """The non-allowlisted URL a failed transfer's ``message`` names, if any."""
        return refused_url(message, self.allowed_hosts)

    def check(self, url: str, model_id: str) -> None:
        """Refuse ``url`` unless its host is on the allowlist (:class:`HostNotAllowed`)."""
        if not host_allowed(url, self.allowed_hosts):
            host = urllib.parse.urlparse(url).hostname
            raise HostNotAllowed(
                f"{model_id}: refusing to download {url}: host {host!r} is not on the "
                f"download allowlist ({', '.join(self.allowed_hosts)}; add it with --allow-host)"
            )

    def open(self, url: str, model_id: str, range_header: str | None):
        """GET ``url`` following redirects by hand (each hop checked); returns the response."""
        for _ in range(8):
            self.check(url, model_id)
            headers = self.headers_for(url)
            if range_header:
                headers["Range"] = range_header
            request = urllib.request.Request(url, headers=headers)
            try:
                return url, _OPENER.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                    url = urllib.parse.urljoin(url, exc.headers["Location"])
                    continue
                if exc.code >= 500 or exc.code == 429:
                    raise Transient(f"HTTP {exc.code} from {url}") from None
                raise DownloadError(f"{model_id}: HTTP {exc.code} fetching {url}") from None
            except (OSError, urllib.error.URLError) as exc:
                raise Transient(f"{url}: {exc}") from None
        raise DownloadError(f"{model_id}: too many redirects fetching {url}")

    def probe(self, url: str, model_id: str) -> Probe:
        """One-byte range GET: final URL, total size, whether ranges are honoured."""
        final, resp = self.open(url, model_id, "bytes=0-0")
        with resp:
            if resp.status == 206:
                total = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
                return Probe(final, int(total) if total.isdigit() else None, True)
            length = resp.headers.get("Content-Length")
            return Probe(final, int(length) if length and length.isdigit() else None, False)
