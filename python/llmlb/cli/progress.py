"""Download progress for the CLI: fleet-wide (from ``GET /v0/nodes``) and local (``pull``).

On a terminal progress is a live ``rich`` bar; when output goes to a file or pipe it is a
few plain lines instead (a live bar would only print its last frame there).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def human_bytes(n: int | None) -> str:
    """``1.5 GiB``-style size; ``-`` for unknown."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class ModelProgress:
    """One model's state across the online nodes of a fleet.

    Attributes:
        state: ``ready`` if some node has it ready, else ``downloading``/``loading``/
            ``failed`` as reported, else ``None`` (no online node reports it).
        bytes: bytes downloaded, summed over the nodes downloading it.
        total: bytes to download, summed over the same nodes.
        nodes_ready: online nodes reporting it ready.
        error: a failing node's reason.
    """

    state: str | None = None
    bytes: int = 0
    total: int = 0
    nodes_ready: int = 0
    error: str | None = None

    @property
    def failed(self) -> bool:
        """Every node that reports the model failed it."""
        return self.state == "failed"

    def describe(self) -> str:
        """One short phrase: ``downloading 12.0 MiB / 253.0 MiB (5%)``, ``ready on 2 nodes``."""
        if self.state == "downloading":
            if self.total:
                pct = 100 * self.bytes / self.total
                return (
                    f"downloading {human_bytes(self.bytes)} / {human_bytes(self.total)}"
                    f" ({pct:.0f}%)"
                )
            return "downloading"
        if self.state == "ready":
            return f"ready on {self.nodes_ready} node{'s' if self.nodes_ready != 1 else ''}"
        if self.state == "failed":
            return f"failed: {self.error or 'unknown error'}"
        return self.state or "-"


def progress_from_nodes(nodes: list[dict[str, Any]], model_id: str) -> ModelProgress:
    """Aggregate the ``models`` reports of online nodes (``GET /v0/nodes``) for one model."""
    states: list[dict[str, Any]] = []
    for node in nodes:
        if node.get("status", "online") != "online":
            continue
        states += [m for m in node.get("models") or () if m.get("id") == model_id]
    ready = sum(1 for m in states if m.get("state") == "ready")
    if ready:
        return ModelProgress("ready", nodes_ready=ready)
    moving = [m for m in states if m.get("state") == "downloading"]
    if moving:
        done = sum(int((m.get("progress") or {}).get("bytes") or 0) for m in moving)
        total = sum(int((m.get("progress") or {}).get("total") or 0) for m in moving)
        return ModelProgress("downloading", bytes=done, total=total)
    if any(m.get("state") == "loading" for m in states):
        return ModelProgress("loading")
    failed = [m for m in states if m.get("state") == "failed"]
    if failed:
        return ModelProgress("failed", error=failed[0].get("error"))
    return ModelProgress()


def byte_bar(console: Console | None = None) -> Progress:
    """A ``rich`` progress display with bytes, rate and ETA columns."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )


class PullDisplay:
    """Shows ``llmlb.node.downloader.DownloadProgress`` snapshots: a total and one row per file.

    Args:
        model_id: the model being pulled.
        stream: where to write (default stderr).
        live: force the live bar on/off (default: when ``stream`` is a terminal).
    """

    LINE_INTERVAL_S = 2.0

    def __init__(self, model_id: str, stream: TextIO | None = None, live: bool | None = None):
        self.model_id = model_id
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._bar: Progress | None = None
        self._total_task: TaskID | None = None
        self._file_tasks: dict[str, TaskID] = {}
        self._files_seen: list[str] = []
        self._last_line_at = 0.0
        self._started = time.monotonic()

    def __enter__(self) -> PullDisplay:
        if self.live:
            self._bar = byte_bar(Console(file=self.stream))
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, p: Any) -> None:
        """Progress callback for ``pull_model``."""
        if self._bar is not None:
            self._update_bar(p)
        else:
            self._update_lines(p)

    def _update_bar(self, p: Any) -> None:
        assert self._bar is not None
        if self._total_task is None:
            self._total_task = self._bar.add_task(self.model_id, total=p.bytes_total or None)
        self._bar.update(
            self._total_task,
            completed=p.bytes_done,
            total=p.bytes_total or None,
            description=f"{self.model_id} [{p.files_done}/{p.files_total} files]",
        )
        if p.filename:
            task = self._file_tasks.get(p.filename)
            if task is None:
                task = self._bar.add_task(f"  {p.filename}", total=p.file_bytes_total or None)
                self._file_tasks[p.filename] = task
            label = f"  {p.filename}" + (" (verifying)" if p.phase == "verifying" else "")
            self._bar.update(
                task,
                completed=p.file_bytes_done,
                total=p.file_bytes_total or None,
                description=label,
            )

    def _update_lines(self, p: Any) -> None:
        now = time.monotonic()
        new_file = p.filename and p.filename not in self._files_seen
        if new_file:
            self._files_seen.append(p.filename)
        finished = p.phase == "done"
        if not (new_file or finished or now - self._last_line_at >= self.LINE_INTERVAL_S):
            return
        self._last_line_at = now
        elapsed = max(now - self._started, 1e-6)
        pct = 100 * p.bytes_done / p.bytes_total if p.bytes_total else 100.0
        rate = p.bytes_done / elapsed
        parts = [
            f"{self.model_id}: {human_bytes(p.bytes_done)} / {human_bytes(p.bytes_total)}",
            f"({pct:.0f}%)",
            f"{human_bytes(int(rate))}/s",
            f"files {p.files_done}/{p.files_total}",
        ]
        if p.filename and not finished:
            parts.append(
                f"{p.filename} {human_bytes(p.file_bytes_done)}/{human_bytes(p.file_bytes_total)}"
            )
        if finished:
            parts.append("done")
        print("  ".join(parts), file=self.stream, flush=True)
