"""Download progress for the CLI: fleet-wide (from ``GET /v0/nodes``, ``llmlb up``) and local
(``pull``), shown by one display (:class:`DownloadDisplay`).

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

from llmlb.protocol import MODEL_STATES, ModelState


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
        downloading: nodes downloading it (possibly while others serve it).
        nodes_ready: online nodes reporting it ready.
        error: a failing node's reason.
    """

    state: str | None = None
    bytes: int = 0
    total: int = 0
    downloading: int = 0
    nodes_ready: int = 0
    error: str | None = None

    @property
    def failed(self) -> bool:
        """No node has the model or is getting it, and some node failed it."""
        return self.state == ModelState.FAILED

    def describe(self) -> str:
        """One short phrase: ``downloading 12.0 MiB / 253.0 MiB (5%)``, ``ready``, ``-``."""
        if self.downloading:
            if not self.total:
                return "downloading"
            pct = 100 * self.bytes / self.total
            return f"downloading {human_bytes(self.bytes)} / {human_bytes(self.total)} ({pct:.0f}%)"
        if self.state == ModelState.FAILED:
            return f"failed: {self.error or 'unknown error'}"
        return self.state or "-"


def progress_from_nodes(nodes: list[dict[str, Any]], model_id: str) -> ModelProgress:
    """Aggregate the ``models`` reports of online nodes (``GET /v0/nodes``) for one model."""
    states: list[dict[str, Any]] = []
    for node in nodes:
        if node.get("status", "online") != "online":
            continue
        states += [m for m in node.get("models") or () if m.get("id") == model_id]
    by_state: dict[str, list[dict[str, Any]]] = {}
    for report in states:
        by_state.setdefault(str(report.get("state")), []).append(report)
    moving = by_state.get(ModelState.DOWNLOADING, [])
    done = sum(int((m.get("progress") or {}).get("bytes") or 0) for m in moving)
    total = sum(int((m.get("progress") or {}).get("total") or 0) for m in moving)
    failed = by_state.get(ModelState.FAILED, [])
    state = next((s for s in MODEL_STATES if s in by_state), None)
    return ModelProgress(
        state=state,
        bytes=done,
        total=total,
        downloading=len(moving),
        nodes_ready=len(by_state.get(ModelState.READY, [])),
        error=failed[0].get("error") if failed else None,
    )


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


@dataclass(frozen=True, slots=True)
class _FleetSnapshot:
    """A :class:`ModelProgress` in the shape of a pull's ``DownloadProgress`` (no files)."""

    bytes_done: int
    bytes_total: int
    phase: str
    files_done: int = 0
    files_total: int = 0
    filename: str | None = None
    file_bytes_done: int = 0
    file_bytes_total: int = 0

    @classmethod
    def of(cls, progress: ModelProgress) -> _FleetSnapshot:
        phase = ModelState.DOWNLOADING if progress.downloading else str(progress.state)
        return cls(progress.bytes, progress.total, phase)


class DownloadDisplay:
    """The CLI's one download progress display: a live bar (a total, and one row per file
    when the snapshots name files) or plain lines.

    It shows ``DownloadProgress`` snapshots (:mod:`llmlb.node.models.download.options`, from
    ``pull``) and :class:`ModelProgress` (a model across a fleet, from ``llmlb up``); use it
    as a context manager (``with``) or call :meth:`close`.

    Args:
        model_id: the model being downloaded.
        stream: where to write (default stderr).
        live: force the live bar on/off (default: when ``stream`` is a terminal).
        prefix: put before each plain line (``"llmlb up: "``).
    """

    LINE_INTERVAL_S = 2.0

    def __init__(
        self,
        model_id: str,
        stream: TextIO | None = None,
        live: bool | None = None,
        prefix: str = "",
    ):
        self.model_id = model_id
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.prefix = prefix
        self._bar: Progress | None = None
        self._total_task: TaskID | None = None
        self._file_tasks: dict[str, TaskID] = {}
        self._files_seen: list[str] = []
        self._last_line_at = 0.0
        self._last_phase: str | None = None
        self._started = time.monotonic()

    def __enter__(self) -> DownloadDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live bar (its last frame stays on screen)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __call__(self, p: Any) -> None:
        """Progress callback for ``pull_model``."""
        if self.live:
            if self._bar is None:
                self._bar = byte_bar(Console(file=self.stream))
                self._bar.start()
            self._update_bar(p)
        else:
            self._update_lines(p)

    def update(self, progress: ModelProgress) -> None:
        """Show a model's progress across a fleet (nothing until some node reports it)."""
        if progress.state is None:
            return
        snapshot = _FleetSnapshot.of(progress)
        if not self.live and not progress.downloading:
            # No bytes to count: one line per state (loading, ready…).
            if snapshot.phase != self._last_phase:
                print(
                    f"{self.prefix}{self.model_id}: {progress.describe()}",
                    file=self.stream,
                    flush=True,
                )
            self._last_phase = snapshot.phase
            return
        self(snapshot)

    def _update_bar(self, p: Any) -> None:
        assert self._bar is not None
        if self._total_task is None:
            self._total_task = self._bar.add_task(self.model_id, total=p.bytes_total or None)
        # ``[...]`` would be rich markup unless it holds a slash, as a file count does.
        what = f"[{p.files_done}/{p.files_total} files]" if p.files_total else f"({p.phase})"
        self._bar.update(
            self._total_task,
            completed=p.bytes_done,
            total=p.bytes_total or None,
            description=f"{self.model_id} {what}",
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
        new_phase = p.phase != self._last_phase
        self._last_phase = p.phase
        if not (
            new_file or finished or new_phase or now - self._last_line_at >= self.LINE_INTERVAL_S
        ):
            return
        self._last_line_at = now
        elapsed = max(now - self._started, 1e-6)
        pct = 100 * p.bytes_done / p.bytes_total if p.bytes_total else 100.0
        rate = p.bytes_done / elapsed
        # Fleet progress names its state (``downloading``); a pull counts files instead.
        state = "" if p.files_total else f"{p.phase} "
        parts = [
            f"{self.prefix}{self.model_id}: {state}{human_bytes(p.bytes_done)} / "
            f"{human_bytes(p.bytes_total)}",
            f"({pct:.0f}%)",
            f"{human_bytes(int(rate))}/s",
        ]
        if not finished and rate > 0 and p.bytes_total > p.bytes_done:
            eta = int((p.bytes_total - p.bytes_done) / rate)
            parts.append(f"ETA {eta // 60}:{eta % 60:02d}")
        if p.files_total:
            parts.append(f"files {p.files_done}/{p.files_total}")
        if p.filename and not finished:
            parts.append(
                f"{p.filename} {human_bytes(p.file_bytes_done)}/{human_bytes(p.file_bytes_total)}"
            )
        if finished:
            parts.append("done")
        print("  ".join(parts), file=self.stream, flush=True)


# The display ``llmlb pull`` and ``llmlb up`` share, by the names they use.
PullDisplay = DownloadDisplay
FleetDownloadDisplay = DownloadDisplay
