"""Readiness checks (contract section 5): database, channel layer, and a bridge's broker connection."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection

from devices import selectors


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def _database() -> Check:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        return Check("database", False, str(exc)[:200])
    return Check("database", True, connection.vendor)


def _bridge() -> Check:
    try:
        health = selectors.bridge_health(max_age=3 * settings.GATEWAY["HEARTBEAT_INTERVAL"] + 5)
    except Exception as exc:
        return Check("broker", False, f"cannot read bridge heartbeats: {str(exc)[:150]}")
    if health.ok:
        return Check("broker", True, f"connected via {', '.join(health.connected)}")
    # What the running bridges say tells a broker that is down (their last error) from bridges that are not running
    # (nothing to say).
    why = "; ".join(f"{name}: {detail}" for name, detail in health.waiting.items())[:250]
    return Check("broker", False, "no bridge reports a broker connection" + (f" ({why})" if why else ""))


async def _layer() -> Check:
    layer: Any = get_channel_layer()
    if layer is None:
        return Check("channel_layer", False, "no channel layer configured")
    try:
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "gateway.readyz"})
        await asyncio.wait_for(layer.receive(channel), 2.0)
    except Exception as exc:
        return Check("channel_layer", False, f"{type(exc).__name__}: {str(exc)[:150]}")
    return Check("channel_layer", True, type(layer).__name__)


async def readiness() -> list[Check]:
    database = await sync_to_async(_database, thread_sensitive=True)()
    bridge = await sync_to_async(_bridge, thread_sensitive=True)()
    return [database, await _layer(), bridge]
