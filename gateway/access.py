"""Keeps open sockets' permissions current (contract section 3: a permission change or token revocation reaches
open sockets within 5 seconds).

One watcher per process and event loop: every ``GATEWAY_ACCESS_REFRESH`` seconds it recomputes the access of each
user with an open socket and checks the tokens those sockets were opened with, in two queries whatever the number
of sockets, then tells each socket what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from devices import selectors
from devices.permissions import DeviceAccess, accesses_for
from gateway.db import db_call

logger = logging.getLogger(__name__)


class WatchedSocket(Protocol):
    user_id: int
    token_id: int | None

    @property
    def access(self) -> DeviceAccess: ...

    async def access_changed(self, access: DeviceAccess) -> None: ...

    async def access_revoked(self) -> None: ...


@db_call
def _current(user_ids: set[int], token_ids: set[int]) -> tuple[dict[int, DeviceAccess], set[int]]:
    return accesses_for(user_ids=user_ids), selectors.valid_token_ids(token_ids=token_ids)


class AccessWatcher:
    _instances: dict[int, AccessWatcher] = {}

    def __init__(self, *, interval: float) -> None:
        self.interval = interval
        self._sockets: set[WatchedSocket] = set()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_loop(cls, *, interval: float) -> AccessWatcher:
        key = id(asyncio.get_running_loop())
        watcher = cls._instances.get(key)
        if watcher is None:
            watcher = cls._instances[key] = cls(interval=interval)
        return watcher

    def register(self, socket: WatchedSocket) -> None:
        self._sockets.add(socket)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-access-watcher")

    def unregister(self, socket: WatchedSocket) -> None:
        self._sockets.discard(socket)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self._sockets:
                continue
            try:
                await self.refresh()
            except Exception as exc:  # the database may be down: keep the last known access, try again
                logger.warning("could not refresh socket permissions: %r", exc)

    async def refresh(self) -> None:
        sockets = list(self._sockets)
        user_ids = {socket.user_id for socket in sockets}
        token_ids = {socket.token_id for socket in sockets if socket.token_id is not None}
        accesses, valid_tokens = await _current(user_ids, token_ids)
        for socket in sockets:
            access = accesses.get(socket.user_id)
            revoked = access is None or (socket.token_id is not None and socket.token_id not in valid_tokens)
            with contextlib.suppress(Exception):
                if revoked:
                    await socket.access_revoked()
                elif access != socket.access:
                    assert access is not None
                    await socket.access_changed(access)
