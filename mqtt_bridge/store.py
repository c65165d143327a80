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


def _fresh_connection() -> None:
    # Like channels.db.database_sync_to_async: drop a connection the database closed (restart, timeout).
    close_old_connections()


class BridgeStore:
    def __init__(self, *, auto_register: bool, max_devices: int) -> None:
        self._auto_register = auto_register
        self._max_devices = max_devices

    def _ingest(self, observations: Sequence[Observation]) -> IngestResult:
        _fresh_connection()
        return services.ingest(
            observations=observations, auto_register=self._auto_register, max_devices=self._max_devices
        )

    async def ingest(self, observations: Sequence[Observation]) -> IngestResult:
        return await sync_to_async(self._ingest, thread_sensitive=True)(observations)

    @staticmethod
    def _in_thread(func: Callable[..., T], **kwargs: Any) -> T:
        _fresh_connection()
        return func(**kwargs)

    async def replies(self, replies: Sequence[Reply]) -> ReplyResult:
        return await sync_to_async(self._in_thread, thread_sensitive=True)(services.record_replies, replies=replies)

    async def claim_commands(self, *, owner: str, lease: float, limit: int, hold_offline: bool) -> list[CommandToSend]:
        return await sync_to_async(self._in_thread, thread_sensitive=True)(
            services.claim_commands, owner=owner, lease=lease, limit=limit, hold_offline=hold_offline
        )

    async def mark_sent(self, *, command_id: str, owner: str) -> list[EventRecord]:
        return await sync_to_async(self._in_thread, thread_sensitive=True)(
            services.mark_sent, command_id=command_id, owner=owner
        )

    async def fail_command(self, *, command_id: str, error: str) -> list[EventRecord]:
        return await sync_to_async(self._in_thread, thread_sensitive=True)(
            services.fail_command, command_id=command_id, error=error
        )

    async def release_claim(self, *, command_id: str) -> None:
        await sync_to_async(self._in_thread, thread_sensitive=True)(services.release_claim, command_id=command_id)

    async def expire_commands(self, *, command_ids: Collection[str], overdue_before: datetime) -> list[EventRecord]:
        return await sync_to_async(self._in_thread, thread_sensitive=True)(
            services.expire_commands, command_ids=command_ids, overdue_before=overdue_before
        )

    def _heartbeat(self, name: str, connected: bool, detail: str) -> None:
        _fresh_connection()
        services.record_bridge_heartbeat(name=name, connected=connected, detail=detail)

    async def heartbeat(self, *, name: str, connected: bool, detail: str) -> None:
        await sync_to_async(self._heartbeat, thread_sensitive=True)(name, connected, detail)

    def _purge(self, retention_days: int) -> int:
        _fresh_connection()
        return services.purge_history(older_than=time.time() - retention_days * 86400)

    async def purge(self, *, retention_days: int) -> int:
        return await sync_to_async(self._purge, thread_sensitive=True)(retention_days)
