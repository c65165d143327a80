"""The bridge's async face of ``devices.services``: every ORM call crosses ``sync_to_async`` here, explicitly."""

from __future__ import annotations

import time
from collections.abc import Sequence

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from devices import services
from devices.records import IngestResult, Observation


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
