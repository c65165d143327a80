"""The web side's outgoing channel-layer traffic: events it stored (command state changes), and the wake-up that
tells bridges a command is waiting. Both are best effort; the database is the truth (clients resume, bridges poll).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

from channels.layers import get_channel_layer

from devices.records import EventRecord
from gateway import metrics
from gateway.events import COMMANDS_GROUP, EVENTS_GROUP, EventsPublisher, commands_wake

logger = logging.getLogger(__name__)

_publisher = EventsPublisher(source=f"web.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}")


async def announce(events: list[EventRecord], *, wake_bridges: bool = False) -> None:
    layer: Any = get_channel_layer()
    try:
        if events:
            await layer.group_send(EVENTS_GROUP, _publisher.message(events))
        if wake_bridges:
            await layer.group_send(COMMANDS_GROUP, commands_wake())
    except Exception as exc:
        metrics.LAYER_SEND_FAILURES.inc()
        logger.warning("channel layer send failed (%r): browsers resume from history, bridges poll", exc)
