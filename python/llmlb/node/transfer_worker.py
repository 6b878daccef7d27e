"""Worker process that runs ``hf_transfer`` downloads for the node's downloader.

``hf_transfer.download`` holds the GIL for a whole transfer, so it never runs inside the
serving process. Protocol: one JSON job per line on stdin
(``{"url", "path", "connections", "chunk_size", "headers"}``); for each job, stdout gets one
``{"n": BYTES}`` line per finished chunk, then ``{"ok": true}`` or ``{"error": MESSAGE}``.
The node keeps its workers between jobs (``downloader.TransferPool``); when the parent dies,
stdin closes (idle worker) or the next progress write fails (busy worker) and the worker
exits.
"""

from __future__ import annotations

import sys

import orjson

# Chunk-level retries inside hf_transfer (dropped connections, 5xx): attempts per chunk and
# how many chunks may be failing at once.
CHUNK_RETRIES = 5
PARALLEL_FAILURES = 4


def _run_job(job: dict, out) -> None:
    """Download one file as ``job`` describes, reporting progress on ``out``."""
    import hf_transfer

    def progress(n: int) -> None:
        out.write(b'{"n":%d}\n' % n)
        out.flush()

    connections = max(1, int(job["connections"]))
    hf_transfer.download(
        url=job["url"],
        filename=job["path"],
        max_files=connections,
        chunk_size=int(job["chunk_size"]),
        parallel_failures=min(PARALLEL_FAILURES, connections),
        max_retries=CHUNK_RETRIES,
        headers=job.get("headers") or None,
        callback=progress,
    )


def main() -> int:
    """Serve jobs from stdin until it closes."""
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            _run_job(orjson.loads(line), out)
        except BrokenPipeError:
            return 1
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
            try:
                out.write(orjson.dumps({"error": str(exc) or type(exc).__name__}) + b"\n")
            except BrokenPipeError:
                return 1
        else:
            out.write(b'{"ok":true}\n')
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
