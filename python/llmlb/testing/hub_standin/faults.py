"""Fault injection for the hub stand-in (``--fault SPEC``).

A spec is ``KIND[:key=value[,key=value...]]``. Kinds:

``drop``     close the connection after ``after=N`` body bytes (default 0: right after the headers)
``status``   answer ``code=N`` (default 503) with a JSON error body instead of serving
``corrupt``  flip one byte (XOR 0xFF) at file offset ``offset=N`` (default: the middle of the file)
``full``     answer a Range request with ``200`` and the whole file
``delay``    wait ``seconds=S`` (default 1) before answering
``fail-first``       answer 503 to the first ``n=N`` GETs of each file, then serve it
                     (``fail-first:N`` for short; a hub outage that ends)
``redirect-ranges``  answer ``302`` to every ranged GET but the ``bytes=0-0`` probe, pointing
                     at the same path under ``to=BASE_URL`` (``redirect-ranges:BASE_URL`` for
                     short; a hub that sends transfers to another host)

Keys every kind takes:

``file=GLOB``     fnmatch pattern on the file's path in the repo (default: every file)
``repo=GLOB``     fnmatch pattern on ``org/name``, case-insensitive (default: every repo)
``route=R``       ``resolve`` (file downloads, the default), ``api`` (``/api/...``) or ``any``;
                  ``drop``, ``corrupt`` and ``full`` only ever apply to file downloads
``method=M``      ``GET``, ``HEAD`` or ``any`` (default ``GET`` for drop/corrupt/full, else ``any``)
``times=K``       how many times the fault fires before requests are served normally
                  (default 1; ``always`` never stops; ``fail-first`` and
                  ``redirect-ranges`` default to ``always``)

A fault fires (and counts) only when it has an effect: ``drop`` when the body is longer than
``after``, ``corrupt`` when the body covers ``offset``, ``full`` when the request has a Range.

Examples: ``drop:file=*.gguf,after=1048576,times=2``, ``status:code=503,times=3,route=any``,
``corrupt:file=model.gguf,times=always``, ``full:times=always``, ``delay:seconds=2``,
``fail-first:6``, ``redirect-ranges:http://localhost:9000``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

KINDS = ("drop", "status", "corrupt", "full", "delay", "fail-first", "redirect-ranges")
_BODY_KINDS = ("drop", "corrupt", "full", "redirect-ranges")
_KEYS = {"file", "repo", "route", "method", "times", "after", "code", "offset", "seconds"}
_KEYS |= {"n", "to"}
# The key a bare value stands for (``fail-first:6``, ``redirect-ranges:http://host:port``).
_POSITIONAL = {"fail-first": "n", "redirect-ranges": "to"}


@dataclass
class Fault:
    """One parsed ``--fault`` spec and how often it has fired."""

    kind: str
    spec: str
    file: str | None = None
    repo: str | None = None
    route: str = "resolve"
    method: str = "any"
    times: int | None = 1  # None: always
    after: int = 0
    code: int = 503
    offset: int | None = None
    seconds: float = 1.0
    n: int = 1
    to: str | None = None
    fired: int = 0
    gets: dict[tuple[str | None, str | None], int] = field(default_factory=dict)

    def applies(self, route: str, method: str, repo: str | None, file: str | None) -> bool:
        """Whether this fault targets a request (ignoring how often it has fired)."""
        if self.route != "any" and self.route != route:
            return False
        if self.method != "any" and self.method != method:
            return False
        if self.repo is not None and (repo is None or not fnmatchcase(repo.lower(), self.repo)):
            return False
        return self.file is None or (file is not None and fnmatchcase(file, self.file))

    def remaining(self) -> bool:
        return self.times is None or self.fired < self.times

    def fire(self) -> None:
        self.fired += 1

    def fails_now(self, repo: str | None, file: str | None) -> bool:
        """``fail-first``: count this request of the file; whether it is one of its first N."""
        key = (repo, file)
        seen = self.gets.get(key, 0)
        self.gets[key] = seen + 1
        return seen < self.n


def parse_fault(spec: str) -> Fault:
    """Parse one ``--fault`` spec.

    Raises:
        ValueError: unknown kind or key, or a malformed value.
    """
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r} in {spec!r} (one of {', '.join(KINDS)})")
    method = "GET" if kind in (*_BODY_KINDS, "fail-first") else "any"
    fault = Fault(kind=kind, spec=spec, method=method)
    if kind in _POSITIONAL:
        fault.times = None
    for index, item in enumerate(filter(None, (part.strip() for part in rest.split(",")))):
        key, sep, value = item.partition("=")
        if not sep and index == 0 and kind in _POSITIONAL:
            key, sep, value = _POSITIONAL[kind], "=", item
        key = key.strip().lower()
        value = value.strip()
        if not sep or key not in _KEYS:
            raise ValueError(f"bad fault option {item!r} in {spec!r}")
        try:
            _apply(fault, key, value)
        except ValueError as exc:
            raise ValueError(f"bad value for {key!r} in fault {spec!r}: {exc}") from None
    if kind in _BODY_KINDS and fault.route != "resolve":
        raise ValueError(f"fault {kind!r} applies to file downloads only (route=resolve)")
    if kind == "redirect-ranges" and not fault.to:
        raise ValueError(f"fault {spec!r} needs the base URL to redirect to (to=URL)")
    return fault


def _apply(fault: Fault, key: str, value: str) -> None:
    if key == "file":
        fault.file = value
    elif key == "repo":
        fault.repo = value.lower()
    elif key == "route":
        if value not in ("resolve", "api", "any"):
            raise ValueError("route must be resolve, api or any")
        fault.route = value
    elif key == "method":
        method = value.upper()
        if method not in ("GET", "HEAD", "ANY"):
            raise ValueError("method must be GET, HEAD or any")
        fault.method = "any" if method == "ANY" else method
    elif key == "times":
        fault.times = None if value.lower() in ("always", "inf", "-1") else int(value)
        if fault.times is not None and fault.times < 0:
            raise ValueError("times must be >= 0 or 'always'")
    elif key == "after":
        fault.after = _non_negative(value)
    elif key == "offset":
        fault.offset = _non_negative(value)
    elif key == "code":
        fault.code = int(value)
        if not 400 <= fault.code <= 599:
            raise ValueError("code must be an HTTP error status")
    elif key == "n":
        fault.n = _non_negative(value)
    elif key == "to":
        if not value.startswith(("http://", "https://")):
            raise ValueError("to must be an http(s) base URL")
        fault.to = value.rstrip("/")
    elif key == "seconds":
        fault.seconds = float(value)
        if fault.seconds < 0:
            raise ValueError("seconds must be >= 0")


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


class FaultPlan:
    """The faults a stand-in was started with, consulted per request."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults

    @classmethod
    def parse(cls, specs: list[str] | None) -> FaultPlan:
        return cls([parse_fault(spec) for spec in specs or []])

    def find(
        self, kind: str, route: str, method: str, repo: str | None = None, file: str | None = None
    ) -> Fault | None:
        """The first fault of ``kind`` that targets this request and has not run out.

        The caller decides whether it takes effect and then calls :meth:`Fault.fire`.
        """
        for fault in self.faults:
            if (
                fault.kind == kind
                and fault.remaining()
                and fault.applies(route, method, repo, file)
            ):
                return fault
        return None
