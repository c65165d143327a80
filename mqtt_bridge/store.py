"""The bridge's async face of ``devices.services``: every ORM call crosses ``sync_to_async`` here, explicitly."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from devices import services
from devices.records import CommandToSend, EventRecord, IngestResult, Observation, Reply, ReplyResult

T = TypeVar("T")


def _in_thread(func: Callable[..., T], kwargs: dict[str, Any]) -> T:
    # Like channels.db.database_sync_to_async: drop a connection the database closed (restart, timeout) first.
    close_old_connections()
    return func(**kwargs)


async def _call(func: Callable[..., T], **kwargs: Any) -> T:
    """Run a service in Django's sync thread (one at a time, like every other ORM call of this process)."""
    return await sync_to_async(_in_thread, thread_sensitive=True)(func, kwargs)


class BridgeStore:
    def __init__(self, *, auto_register: bool, max_devices: int) -> None:
        self._auto_register = auto_register
        self._max_devices = max_devices

    async def ingest(self, observations: Sequence[Observation]) -> IngestResult:
        return await _call(
            services.ingest,
            observations=observations,
            auto_register=self._auto_register,
            max_devices=self._max_devices,
        )

    async def replies(self, replies: Sequence[Reply]) -> ReplyResult:
        return await _call(services.record_replies, replies=replies)

    async def claim_commands(self, *, owner: str, lease: float, limit: int, hold_offline: bool) -> list[CommandToSend]:
        return await _call(services.claim_commands, owner=owner, lease=lease, limit=limit, hold_offline=hold_offline)

    async def mark_sent(self, *, command_id: str, owner: str) -> list[EventRecord]:
        return await _call(services.mark_sent, command_id=command_id, owner=owner)

    async def fail_command(self, *, command_id: str, error: str) -> list[EventRecord]:
        return await _call(services.fail_command, command_id=command_id, error=error)

    async def release_claim(self, *, command_id: str) -> None:
        await _call(services.release_claim, command_id=command_id)

    async def expire_commands(
        self, *, command_ids: Collection[str], overdue_before: datetime, held: Collection[str] = ()
    ) -> list[EventRecord]:
        return await _call(services.expire_commands, command_ids=command_ids, overdue_before=overdue_before, held=held)

    async def heartbeat(self, *, name: str, connected: bool, detail: str) -> None:
        await _call(services.record_bridge_heartbeat, name=name, connected=connected, detail=detail)

    async def hold_lease(self, *, name: str, owner: str, ttl: float) -> bool:
        return await _call(services.hold_lease, name=name, owner=owner, ttl=ttl)

    async def release_lease(self, *, name: str, owner: str) -> None:
        await _call(services.release_lease, name=name, owner=owner)

    async def purge(self, *, retention_days: int) -> int:
        return await _call(services.purge_history, older_than=time.time() - retention_days * 86400)
