"""Tuning and progress of downloads: :class:`DownloadOptions`, :class:`DownloadProgress`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmlb.node.models.pieces import PIECE_SIZE

# Files smaller than this are fetched with one plain GET (parallel ranges do not pay off).
PARALLEL_MIN_BYTES = 8 << 20
# Fewest range connections a large file gets when several share the budget.
MIN_FILE_CONNECTIONS = 8
MIB = 1 << 20
# Parallel range connections per downloaded file: measured best (bench/README.md, Cold start).
DEFAULT_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class DownloadProgress:
    """A snapshot of one model's download, passed to progress callbacks."""

    model_id: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    filename: str | None = None
    file_bytes_done: int = 0
    file_bytes_total: int = 0
    phase: str = "downloading"  # downloading | verifying | done
    bytes_from_hub: int = 0  # of the files verified so far
    bytes_from_peers: int = 0


ProgressCallback = Callable[[DownloadProgress], None]


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    """Tuning of the downloader.

    Attributes:
        connections: parallel range connections (``hf_transfer`` ``max_files``) of a file
            downloading alone; large files downloading at once share them (at least
            ``MIN_FILE_CONNECTIONS`` each).
        parallel_files: files of one model fetched at once (each with its own hasher).
        max_attempts: attempts per file on transient failures (5xx, dropped connections).
        backoff_base_s: first retry delay; doubles up to ``backoff_max_s``.
        timeout_s: socket timeout of probes and single-stream GETs.
        disk_margin_bytes: free space kept beyond the bytes still to download.
        peer_connections: range connections to the peer a file is fetched from.
        peer_hub_after_s: when a file's peer delivers less than ``peer_min_rate`` bytes/s
            this long after its start, the hub joins in for the rest.
        peer_min_rate: see ``peer_hub_after_s`` (0: the hub only takes over from a peer
            that is gone).
        piece_size: bytes per piece of a swarm download (:mod:`llmlb.node.models.pieces`).
    """

    connections: int = DEFAULT_CONNECTIONS
    parallel_files: int = 4
    max_attempts: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    timeout_s: float = 30.0
    disk_margin_bytes: int = 64 * MIB
    peer_connections: int = 8
    peer_hub_after_s: float = 3.0
    peer_min_rate: float = 8 * MIB
    piece_size: int = PIECE_SIZE


def chunk_size_for(size: int, connections: int) -> int:
    """Range size for a file: about eight chunks per connection, 1–16 MiB, whole MiB.

    Small chunks keep the window of ranges in flight small, so the hasher that follows the
    written prefix is never far behind when the last range lands.
    """
    target = size // max(1, connections * 8)
    return max(1, min(16, target // MIB)) * MIB
