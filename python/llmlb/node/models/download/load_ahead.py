"""Load a model from its landed bytes while the hash of its file finishes.

Once every byte of a model's GGUF is on disk and its header and tensor layout pass the
native check (:func:`llmlb.model_storage.inspect_gguf`), :class:`~.fetch.ModelFetch` calls
:meth:`LoadAhead.landed` and the engine starts loading it (mmap, context creation) while the
file's sha256 is still being computed. The model is loaded, never served: the resolver keeps
it ``downloading`` (requests get ``model_not_ready``) until the download was verified and
promoted, then awaits :meth:`LoadAhead.settle`. When the file fails its check
(:meth:`LoadAhead.discarded`) or the download fails (:meth:`LoadAhead.drop`), the model is
unloaded; the refetched file lands and loads again.

Operations run one after another on the event loop (a load is finished before the unload
that follows it starts), so an unload never misses a load still in flight and a new load
never joins the one being dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

logger = logging.getLogger(__name__)

LoadFn = Callable[[str, str], Awaitable[None]]
UnloadFn = Callable[[str], Awaitable[None]]


class LoadAhead:
    """One model's load from unverified bytes, dropped unless the download verifies.

    Args:
        loop: the event loop the engine runs on (hooks are called from download threads).
        model_id: the model.
        load: the engine's ``load(model_id, path)``.
        unload: the engine's ``unload(model_id)``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, model_id: str, load: LoadFn,
                 unload: UnloadFn):
        self.loop = loop
        self.model_id = model_id
        self._load = load
        self._unload = unload
        self._tail: asyncio.Task | None = None
        self.loaded = False  # the last load succeeded and was not dropped since
        self.loads = 0  # loads started (for logs and tests)
        self.drops = 0

    # -- from download threads --

    def landed(self, path: Path) -> None:
        """Every byte of the model's GGUF is at ``path`` and its layout is valid: load it."""
        self.loop.call_soon_threadsafe(self._chain, self._do_load, str(path))

    def discarded(self) -> None:
        """The landed file failed its check (or was given up): unload what it loaded."""
        self.loop.call_soon_threadsafe(self._chain, self._do_unload, "its file failed a check")

    # -- on the loop --

    async def settle(self) -> bool:
        """Wait for every pending operation; whether the model is loaded now."""
        while self._tail is not None and not self._tail.done():
            await asyncio.wait({self._tail})
        return self.loaded

    async def drop(self, why: str = "the download failed") -> None:
        """Unload the model if a load ahead loaded it (the download did not verify)."""
        self._chain(self._do_unload, why)
        await self.settle()

    def _chain(self, step: Callable[[str], Awaitable[None]], arg: str) -> None:
        previous = self._tail

        async def run() -> None:
            if previous is not None:
                await asyncio.wait({previous})
            await step(arg)

        self._tail = self.loop.create_task(run())

    async def _do_load(self, path: str) -> None:
        if not Path(path).exists():
            # Its turn came after the hash: the file was verified and promoted (or
            # discarded) already, and the verified file loads the usual way.
            logger.info("%s: no load during the hash: %s was moved first", self.model_id, path)
            return
        self.loads += 1
        started = time.monotonic()
        try:
            await self._load(self.model_id, path)
        except Exception as exc:  # noqa: BLE001 - it loads after promotion instead
            logger.warning("%s: load during the hash failed: %s", self.model_id, exc)
            self.loaded = False
            return
        self.loaded = True
        logger.info(
            "%s: loaded during the hash in %.3fs (not served until verified)",
            self.model_id,
            time.monotonic() - started,
        )

    async def _do_unload(self, why: str) -> None:
        if not self.loaded:
            return
        self.loaded = False
        self.drops += 1
        try:
            await self._unload(self.model_id)
        except Exception as exc:  # noqa: BLE001 - logged; the engine keeps no reference
            logger.warning("%s: unloading unverified load failed: %s", self.model_id, exc)
        logger.warning("%s: unverified load dropped: %s", self.model_id, why)
