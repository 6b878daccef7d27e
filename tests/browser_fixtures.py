"""A real headless Chromium (Debian's ``chromium`` package) driven by Playwright, for tests of
the router's dashboard.

Playwright talks the DevTools protocol to the system browser (``executable_path``); it never
downloads one (``playwright install`` is not needed). Where no Chromium is installed the
browser tests are skipped, except under CI (``CI`` set), where ``.ci/run`` installs it and a
missing browser is a failure.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tests.requirements import missing

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# Chromium logs a fetch answered 4xx as a console error; a page that shows API errors by
# design makes such requests (a wrong key, a bad repo), so only those are tolerated.
_EXPECTED_HTTP_ERROR = re.compile(
    r"Failed to load resource: the server responded with a status of 4\d\d"
)


def chromium_executable() -> str | None:
    """The system Chromium (``LLMLB_TEST_CHROMIUM`` wins), or ``None``."""
    if explicit := os.environ.get("LLMLB_TEST_CHROMIUM"):
        return explicit
    for name in _CANDIDATES:
        if found := shutil.which(name):
            return found
    return None


def _unavailable(reason: str) -> None:
    missing(reason, ".ci/run installs Debian's chromium and the test extra's playwright")


@contextmanager
def launch_chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``), closed on exit."""
    executable = chromium_executable()
    if executable is None:
        _unavailable("no Chromium installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (the test extra)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            # Root in a container has no user namespace for the sandbox; /dev/shm may be tiny.
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageWatch:
    """Everything a page did that a test checks afterwards."""

    origin: str
    requests: list[Any] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("request", lambda request: self.requests.append(request))
        page.on(
            "console",
            lambda message: message.type == "error" and self.console_errors.append(message.text),
        )
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def foreign_requests(self) -> list[str]:
        """URLs of requests to anything but the router (data: and about: included)."""
        want = urlsplit(self.origin)
        return [
            request.url
            for request in self.requests
            if (urlsplit(request.url).scheme, urlsplit(request.url).netloc)
            != (want.scheme, want.netloc)
        ]

    def unexpected_console_errors(self) -> list[str]:
        """Console errors other than the 4xx answers the page shows on purpose."""
        return [text for text in self.console_errors if not _EXPECTED_HTTP_ERROR.search(text)]


def distinct_colours(browser: Any, png: bytes, step: int = 4) -> int:
    """How many different colours a PNG screenshot holds (every ``step``-th pixel), counted by
    the browser itself in a blank page of its own."""
    page = browser.new_page()
    try:
        page.set_content("<canvas></canvas>")
        return page.evaluate(
            """async ([data, step]) => {
                const image = new Image();
                image.src = "data:image/png;base64," + data;
                await image.decode();
                const canvas = document.querySelector("canvas");
                canvas.width = image.width;
                canvas.height = image.height;
                const context = canvas.getContext("2d");
                context.drawImage(image, 0, 0);
                const pixels = context.getImageData(0, 0, image.width, image.height).data;
                const seen = new Set();
                for (let i = 0; i < pixels.length; i += 4 * step) {
                    seen.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
                }
                return seen.size;
            }""",
            [base64.b64encode(png).decode(), step],
        )
    finally:
        page.close()
