"""The node's side of the router protocol: register, pull the model list, heartbeat, sync.

At start the node registers (``POST /v0/nodes``) with the models already in its store,
fetches ``/v0/models`` and resolves each model in the background, then heartbeats every
``heartbeat_interval_s`` with per-model state. If the router is unreachable, the node keeps
serving its local models and retries with backoff. ``POST /api/models/sync`` from the router
starts resolving the models it names, each asking the router for its own manifest only.

Notifications can be missed (the node was down, or the router restarted and counts nodes
offline until their next heartbeat), so the node also reconciles with the whole registry every
``reconcile_interval_s``, after re-registering, and after heartbeats failed: it downloads
models newly registered and removes models it downloaded that are no longer registered
(models placed by hand are always kept).

A fleet may have several routers sharing one database (``--router URL1,URL2``): the node
registers and heartbeats to one, and moves on to the next when it fails (unreachable, or an
error of its own: 5xx). The registration and the sync token live in the shared database, so
any router of the fleet may send sync notifications, and the node accepts them all.

``aiohttp`` is imported when the loop starts, in a thread, overlapping the store scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from llmlb import config
from llmlb.http import bearer_token
from llmlb.model_storage import InvalidModelId, normalize_model_id
from llmlb.node.inference.engine import Engine
from llmlb.node.models import runtimes
from llmlb.node.models.download.staging import forget_downloaded, was_downloaded
from llmlb.node.models.identity import node_secret, save_fleet_credential
from llmlb.node.models.membership import Membership
from llmlb.node.models.resolver import Resolver
from llmlb.node.settings import NodeSettings
from llmlb.protocol import (
    Approval,
    Heartbeat,
    HeartbeatAnswer,
    ModelState,
    Registration,
    RegistrationAnswer,
)

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 5.0
BACKOFF_MAX_S = 30.0


class RouterSync:
    """Keep the router informed and the store in line with the router's registry.

    Args:
        settings: node settings (router URL, key, slots …).
        node_id: this node's stable id.
        resolver: model resolution and state.
        engine: loaded models (for active requests, unloading on delete).
        gpu: returns the ``gpu`` object of the registration (blocking; called in a thread,
            so a slow probe overlaps the store scan).
        membership: where the id and the peer credential the router gives are kept for the
            node's other parts (a private one when ``None``).
    """

    def __init__(
        self,
        settings: NodeSettings,
        node_id: str,
        resolver: Resolver,
        engine: Engine,
        gpu: Callable[[], dict[str, Any]],
        membership: Membership | None = None,
    ):
        self.settings = settings
        self.membership = membership or Membership(node_id)
        self.routers = config.router_urls(settings.router_url)
        self._router = 0  # index in ``routers`` of the one spoken to now
        # Binds node_id to this node on the router: sent with registrations and heartbeats.
        self.node_secret = node_secret(settings.models_dir, node_id)
        self.resolver = resolver
        self.engine = engine
        self.gpu_probe = gpu
        self.gpu: dict[str, Any] = {"backend": "cpu"}
        self.ready = asyncio.Event()
        self.registered = False
        self.sync_token: str | None = None
        self.approval: str | None = None  # "approved" or "pending" (None: not said)
        self.interval = settings.heartbeat_interval_s
        self.reconciles = 0
        self._last_reconcile = 0.0
        self._missed_heartbeats = False
        self._kick = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self._main: asyncio.Task | None = None

    @property
    def node_id(self) -> str:
        """The id this node is registered under."""
        return self.membership.node_id

    @node_id.setter
    def node_id(self, value: str) -> None:
        self.membership.node_id = value

    @property
    def peer_token(self) -> str | None:
        """The fleet credential of ``/v0/peer/*`` the router handed out."""
        return self.membership.peer_token

    @peer_token.setter
    def peer_token(self, value: str | None) -> None:
        if value != self.membership.peer_token:
            try:  # for `llmlb pull` on this machine
                save_fleet_credential(self.settings.models_dir, self.node_id, value)
            except OSError as exc:
                logger.warning("cannot record the fleet credential: %s", exc)
        self.membership.peer_token = value

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background loop: scan the store, register, sync (returns at once)."""
        self._main = asyncio.get_running_loop().create_task(self._run())

    async def _open_session(self) -> None:
        """Import aiohttp (in a thread) and open the router session."""
        loop = asyncio.get_running_loop()
        aiohttp = await loop.run_in_executor(None, _import_aiohttp)
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.settings.api_key}"}
            if self.settings.api_key
            else {},
            timeout=aiohttp.ClientTimeout(total=REGISTER_TIMEOUT_S),
        )

    async def close(self) -> None:
        """Stop heartbeating and background work."""
        for task in [self._main, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._main, *self._tasks]:
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        if self._session is not None:
            await self._session.close()

    @property
    def router_url(self) -> str:
        """The router this node registers and heartbeats with now (``""``: none)."""
        return self.routers[self._router] if self.routers else ""

    def _fail_over(self) -> bool:
        """Move on to the next router of the list; ``False`` when there is only one."""
        if len(self.routers) < 2:
            return False
        self._router = (self._router + 1) % len(self.routers)
        logger.info("switching to router %s", self.router_url)
        return True

    def kick(self) -> None:
        """Send a heartbeat soon (a model changed state)."""
        self._kick.set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reports ------------------------------------------------------------------------

    def model_reports(self) -> list[dict[str, Any]]:
        """Per-model state of every model this node has or is working on."""
        return self.resolver.reports()

    def _registration(self) -> dict[str, Any]:
        return Registration(
            node_id=self.node_id,
            url=self.settings.url,
            runtimes=list(runtimes.RUNTIMES),
            gpu=self.gpu,
            slots=self.settings.engine.concurrency,
            models=self.model_reports(),
            node_secret=self.node_secret,
        ).to_dict()

    # -- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.routers:
            await self.resolver.refresh()
            self.ready.set()
            return
        # Overlap the store scan (C++, GIL released) with the imports registration needs.
        gpu = loop.run_in_executor(None, self.gpu_probe)
        session = loop.create_task(self._open_session())
        await self.resolver.refresh()
        await session
        self.gpu = await gpu
        if not await self._register_and_pull():
            self.ready.set()
            logger.warning(
                "router %s unreachable; serving local models, retrying",
                ", ".join(self.routers),
            )
            delay = 0.5
            tried = 1
            while not await self._register_and_pull():
                if tried % len(self.routers) == 0:  # every router tried once: back off
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, BACKOFF_MAX_S)
                tried += 1
        self.ready.set()
        await self._heartbeat_loop()

    async def _register_and_pull(self) -> bool:
        """Register and reconcile with the router's registry; ``False`` if unreachable."""
        try:
            answer = await self._post("/v0/nodes", self._registration())
        except RouterError as exc:
            self.registered = False
            if exc.code == ID_CONFLICT:
                logger.error(
                    "node id %s is registered on the router by another node; an admin must "
                    "remove it there (DELETE /v0/nodes/%s) or this node needs another id",
                    self.node_id,
                    self.node_id,
                )
            else:
                logger.info("registration failed: %s", exc)
            return False
        except (*_client_errors(), TimeoutError) as exc:  # type: ignore[misc]
            logger.info("registration failed: %s", exc)
            return False
        registered = RegistrationAnswer.from_dict(answer)
        self.sync_token = registered.sync_token
        self.interval = registered.heartbeat_interval_s or self.interval
        self.node_id = registered.node_id or self.node_id
        self.registered = True
        logger.info("registered with %s as %s", self.router_url, self.node_id)
        self._membership(registered)
        await self.pull_registry()
        return True

    async def pull_registry(self, only: list[str] | None = None) -> bool:
        """Reconcile the store with the router's registry.

        With ``only`` (a sync notification: ``register`` or ``retry``), start resolving the
        named models missing here, retrying failed ones at once: each resolution asks the
        router for that model's manifest alone and drops a model the router does not know
        (no ``/v0/models`` list). Without, fetch ``/v0/models`` and reconcile everything:
        resolve every registered model missing here (failed ones whose backoff has passed),
        and remove the models this node downloaded that are no longer registered.

        Returns:
            Whether the router answered (``True`` for ``only``: the resolutions ask it).
        """
        if only is not None:
            for model_id in dict.fromkeys(only):
                if model_id not in self.resolver.available and not self.resolver.busy(model_id):
                    self.resolver.ensure(model_id, retry_failed=True)
            return True
        try:
            body = await self._get("/v0/models")
        except (*_client_errors(), TimeoutError, RouterError) as exc:  # type: ignore[misc]
            logger.warning("cannot list the router's models: %s", exc)
            return False
        registered = [m["id"] for m in body.get("models", []) if isinstance(m, dict)]
        for model_id in registered:
            if model_id in self.resolver.available or self.resolver.busy(model_id):
                continue
            self.resolver.ensure(model_id, retry_failed=False)
        self._last_reconcile = time.monotonic()
        self.reconciles += 1
        known = set(registered)
        candidates = [m for m in self.resolver.available if m not in known]
        models_dir = self.resolver.models_dir
        stale = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [m for m in candidates if was_downloaded(models_dir, m)]
        )
        if stale:
            logger.info("no longer registered on the router: %s", ", ".join(stale))
            await self._delete(stale)
        return True

    async def _heartbeat_loop(self) -> None:
        """Heartbeat every ``interval`` (sooner when kicked); reconcile when due.

        A full reconcile runs every ``reconcile_interval_s`` on its own clock, and after the
        first heartbeat that succeeds following failed ones (the router may have restarted).
        """
        next_beat = 0.0
        failures = 0  # heartbeats failed in a row (each moved on to the next router)
        while True:
            now = time.monotonic()
            next_reconcile = self._last_reconcile + self.settings.reconcile_interval_s
            wait = max(0.0, min(next_beat, next_reconcile) - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)
            now = time.monotonic()
            if self._kick.is_set() or now >= next_beat:
                self._kick.clear()
                next_beat = now + self.interval
                try:
                    reregistered = await self._heartbeat()
                    failures = 0
                    if reregistered:
                        self._missed_heartbeats = False  # reconciled already
                        continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep heartbeating
                    logger.warning("heartbeat failed: %s", exc)
                    self._missed_heartbeats = True
                    failures += 1
                    if failures < len(self.routers):
                        next_beat = now  # the next router of the fleet, at once
                    continue
            due = time.monotonic() >= self._last_reconcile + self.settings.reconcile_interval_s
            if self._missed_heartbeats or due:
                # sync notifications may have been missed while the router could not reach us
                if await self.pull_registry():
                    self._missed_heartbeats = False
                else:
                    self._last_reconcile = time.monotonic()  # retried when next due

    async def _heartbeat(self) -> bool:
        """Send one heartbeat; ``True`` when the router had forgotten us and we re-registered."""
        await self.resolver.refresh()
        body = Heartbeat(
            models=self.model_reports(),
            active_requests=self.engine.active_requests(),
            slots=self.settings.engine.concurrency,
            runtimes=list(runtimes.RUNTIMES),
            node_secret=self.node_secret,
        ).to_dict()
        try:
            answer = await self._post(f"/v0/nodes/{self.node_id}/heartbeat", body)
            self._membership(HeartbeatAnswer.from_dict(answer))
        except RouterError as exc:
            # 404: the router forgot us; 409: our registration changed (an admin removed the
            # node, maybe another took the id). Register again (and reconcile).
            if exc.status == 404 or exc.code == ID_CONFLICT:
                logger.info("router %s this node; registering again", _forgot(exc))
                if await self._register_and_pull():
                    return True
            raise
        return False

    def _membership(self, answer: HeartbeatAnswer) -> None:
        """Take the approval and peer token of a registration or heartbeat answer."""
        approval = answer.approval
        if approval == Approval.PENDING:
            self.peer_token = None  # no peer transfers until approved
            if self.approval != Approval.PENDING:
                logger.warning(
                    "node %s waits for an admin to approve it on the router (llmlb nodes "
                    "approve %s); until then it gets no client traffic and no peer transfers",
                    self.node_id,
                    self.node_id,
                )
        else:
            self.peer_token = answer.peer_token or self.peer_token
            if approval == Approval.APPROVED and self.approval == Approval.PENDING:
                logger.info("node %s approved by the router", self.node_id)
        self.approval = approval

    # -- sync notifications -------------------------------------------------------------

    def check_sync_token(self, authorization: str | None) -> bool:
        """Whether ``authorization`` carries the sync token the router gave this node.

        Compared as bytes, so any header (non-ASCII included) is a clean ``False``.
        """
        token = bearer_token(authorization)
        if not self.sync_token or token is None:
            return False
        return hmac.compare_digest(token, self.sync_token.encode())

    def handle_sync(self, action: str, model_ids: list[str]) -> None:
        """Reconcile the named models in the background (``register``, ``retry``, ``delete``)."""
        ids = []
        for raw in model_ids:
            with contextlib.suppress(InvalidModelId):
                ids.append(normalize_model_id(raw))
        if action == "delete":
            self._spawn(self._delete(ids))
        else:
            self._spawn(self.pull_registry(only=ids))

    async def _delete(self, model_ids: list[str]) -> None:
        models_dir = self.resolver.models_dir
        loop = asyncio.get_running_loop()
        for model_id in model_ids:
            await self.resolver.cancel(model_id)
            if not was_downloaded(models_dir, model_id):
                state = self.resolver.state_of(model_id)
                if state is not None and state.state == ModelState.FAILED:
                    self.resolver.forget_local(model_id)
                logger.info("%s: deleted on the router; kept (placed by hand)", model_id)
                continue
            await self.engine.unload(model_id)
            await loop.run_in_executor(None, self.resolver.store.delete_model, model_id)
            forget_downloaded(models_dir, model_id)
            self.resolver.forget_local(model_id)
            logger.info("%s: deleted on the router; removed from the store", model_id)
        self.kick()

    # -- HTTP ---------------------------------------------------------------------------

    async def _post(self, path: str, body: dict) -> dict:
        assert self._session is not None
        session = self._session
        data = orjson.dumps(body)
        return await self._call(
            lambda url: session.post(url, data=data, headers={"Content-Type": "application/json"}),
            path,
        )

    async def _get(self, path: str) -> dict:
        assert self._session is not None
        return await self._call(self._session.get, path)

    async def _call(self, request: Callable[[str], Any], path: str) -> dict:
        """One request to the current router; a failure of the router itself (unreachable,
        timeout, 5xx) moves the next call on to the next router of the fleet."""
        try:
            async with request(self.router_url + path) as resp:
                return await _answer(resp)
        except RouterError as exc:
            if exc.status >= 500:
                self._fail_over()
            raise
        except (*_client_errors(), TimeoutError):  # type: ignore[misc]
            self._fail_over()
            raise


ID_CONFLICT = "node_id_conflict"


class RouterError(Exception):
    """The router answered with an error status (``code``: the error body's, if any)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"router answered {status}: {message}")
        self.status = status
        self.code = code


def _forgot(exc: RouterError) -> str:
    return "does not know" if exc.status == 404 else "has another registration for"


def _import_aiohttp():
    import aiohttp

    return aiohttp


def _client_errors() -> tuple[type[BaseException], ...]:
    """aiohttp's client errors (aiohttp is imported by then: the session exists)."""
    import aiohttp

    return (aiohttp.ClientError,)


async def _answer(resp: aiohttp.ClientResponse) -> dict:
    raw = await resp.read()
    if resp.status >= 400:
        code = None
        try:
            error = orjson.loads(raw)["error"]
            message, code = error["message"], error.get("code")
        except Exception:  # noqa: BLE001 - best effort
            message = raw[:200].decode(errors="replace")
        raise RouterError(resp.status, message, code)
    return orjson.loads(raw) if raw else {}
