"""Everything that crosses the channel layer: group names and message shapes, in one module.

Both the bridge and the web side import this module and nothing else of each other. The bridge sends one
``gateway.events`` message per stored batch to ``EVENTS_GROUP``; each web process has one member in that group
(its ``Hub``) and fans the batch out to its own sockets. Each event is serialized to its WebSocket frame once,
here, by whoever publishes it; every receiver reuses that text.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any, Final, Literal, NotRequired, TypedDict

import orjson

from devices.records import EventRecord

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

# Channels' rule for group names (channels.layers.BaseChannelLayer): ASCII letters, digits, -, _ and . only,
# shorter than 100 characters.
# Matched with fullmatch: Channels' own ``^...$`` with ``\d`` also lets a trailing newline and non-ASCII digits in.
_GROUP_NAME_RE = re.compile(r"[a-zA-Z0-9\-_.]+")
_GROUP_NAME_MAX = 100


def group_name(*parts: str) -> str:
    """Join ``parts`` with dots and check the result against Channels' group-name rule."""
    name = ".".join(parts)
    if not parts or len(name) >= _GROUP_NAME_MAX or not _GROUP_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid channel-layer group name {name!r}: ASCII letters, digits, - _ . only, under {_GROUP_NAME_MAX}"
        )
    return name


EVENTS_GROUP = group_name("gateway", "events")
"""Every stored device event, in batches; one member per web process."""

EVENTS_MESSAGE_TYPE: Final = "gateway.events"

COMMANDS_GROUP = group_name("gateway", "commands")
"""Bridges listen here to be woken when a command is stored; losing a wake-up costs at most a poll interval."""

COMMANDS_WAKE_TYPE: Final = "gateway.commands.wake"

GROUP_EXPIRY: Final = 1800
"""Seconds a group membership lasts unless renewed (the channel layers' ``group_expiry``; Channels' default is a
day). A process that goes without leaving its groups (SIGKILL, OOM, a host crash, and any stop of a web process:
Daphne has no shutdown hook) stays a member that long, and every batch sent meanwhile is also queued for it in Redis
(up to the layer's expiry or capacity)."""

GROUP_REFRESH: Final = GROUP_EXPIRY / 3
"""Seconds between renewals of a live member (``keep_membership``): two renewals may fail before it expires."""


async def keep_membership(layer: Any, group: str, channel: str, interval: float = GROUP_REFRESH) -> None:
    """Renew ``channel``'s membership of ``group`` every ``interval`` seconds, for as long as it runs (a task beside
    the channel's receiver). A failed renewal is logged and tried again at the next interval."""
    while True:
        await asyncio.sleep(interval)
        try:
            await layer.group_add(group, channel)
        except Exception as exc:
            logger.warning("could not renew %s in group %s (%r); trying again in %.0f s", channel, group, exc, interval)


class CommandsWake(TypedDict):
    type: Literal["gateway.commands.wake"]


def commands_wake() -> CommandsWake:
    return {"type": COMMANDS_WAKE_TYPE}


class WireEvent(TypedDict):
    """One event inside a layer message: enough to route it, plus its ready-made frame text."""

    id: int
    device: str
    frame: str


class EventsMessage(TypedDict):
    """One stored batch, in id order. ``source`` numbers its messages (``seq``), so a receiver can count messages
    lost in the layer (it recovers their events from the database by id)."""

    type: Literal["gateway.events"]
    source: str
    seq: int
    events: list[WireEvent]


def event_frame(record: EventRecord) -> dict[str, Any]:
    """The WebSocket frame (contract section 3) for one stored event."""
    frame: dict[str, Any] = {
        "type": record.kind.value,
        "id": record.id,
        "device": record.device_id,
        "ts": record.ts,
    }
    if record.device_ts is not None:
        frame["device_ts"] = record.device_ts
    frame.update(record.body)
    return frame


def wire_event(record: EventRecord) -> WireEvent:
    return {"id": record.id, "device": record.device_id, "frame": orjson.dumps(event_frame(record)).decode()}


class EventsPublisher:
    """Numbers the ``gateway.events`` messages of one sender (one bridge process)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._seq = 0

    def message(self, records: Sequence[EventRecord]) -> EventsMessage:
        self._seq += 1
        return {
            "type": EVENTS_MESSAGE_TYPE,
            "source": self.source,
            "seq": self._seq,
            "events": [wire_event(record) for record in records],
        }


def parse_events_message(message: dict[str, Any]) -> EventsMessage:
    """Check the shape of a layer message; ``ValueError`` names what is wrong with it."""
    if message.get("type") != EVENTS_MESSAGE_TYPE:
        raise ValueError(f"not a {EVENTS_MESSAGE_TYPE} message: type {message.get('type')!r}")
    if not isinstance(message.get("events"), list) or not isinstance(message.get("source"), str):
        raise ValueError(f"malformed {EVENTS_MESSAGE_TYPE} message: keys {sorted(message)!r}")
    if not _is_int(message.get("seq")):
        raise ValueError(f"malformed {EVENTS_MESSAGE_TYPE} message: seq is not an integer")
    for event in message["events"]:
        if not (
            isinstance(event, dict)
            and _is_int(event.get("id"))
            and isinstance(event.get("device"), str)
            and isinstance(event.get("frame"), str)
        ):
            raise ValueError(f"malformed {EVENTS_MESSAGE_TYPE} message: bad event {str(event)[:80]}")
    return message  # type: ignore[return-value]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- Frames the web side writes (server -> browser) -----------------------------------------------------------


class ErrorFrame(TypedDict):
    type: Literal["error"]
    code: str
    message: str
    ref: NotRequired[str]


def batch_frame(frames: list[str]) -> str:
    """One text frame for several pre-serialized event frames (contract: ``{"type": "batch", ...}``)."""
    if len(frames) == 1:
        return frames[0]
    return '{"type":"batch","events":[' + ",".join(frames) + "]}"


def gap_frame(first: int, last: int) -> str:
    return orjson.dumps({"type": "gap", "from": first, "to": last}).decode()
