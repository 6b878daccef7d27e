"""One logging set-up for every llmlb process (router, node, CLI, test doubles)."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Send ``llmlb`` logs to stderr at ``level`` unless logging was configured already."""
    root = logging.getLogger("llmlb")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False
