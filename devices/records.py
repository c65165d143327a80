"""Plain data passed into and out of the devices app (no ORM objects cross its boundary)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EventKind(StrEnum):
    TELEMETRY = "telemetry"
    STATUS = "status"
    EVENT = "event"
    COMMAND = "command"


@dataclass(frozen=True, slots=True)
class Observation:
    """One validated message from a device, ready to be stored.

    ``body`` is the kind-specific part of the event as the contract shows it: ``{"values": {...}}`` for
    telemetry, ``{"online": bool}`` for status, ``{"name", "severity", "message"?, "data"?}`` for events.
    """

    device_id: str
    kind: EventKind
    received_at: float
    body: dict[str, Any]
    device_ts: float | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A stored event: what history, replay and live delivery all send."""

    id: int
    device_id: str
    kind: EventKind
    ts: float
    body: dict[str, Any]
    device_ts: float | None = None


class Rejection(StrEnum):
    """Why an observation was not stored (metric label values)."""

    DUPLICATE = "duplicate_seq"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_CAP = "device_cap"
    UNCHANGED_STATUS = "unchanged_status"
    STORE_ERROR = "store_error"


@dataclass(slots=True)
class IngestResult:
    """What ``services.ingest`` stored, in id order, and what it skipped, by reason."""

    stored: list[EventRecord] = field(default_factory=list)
    skipped: dict[Rejection, int] = field(default_factory=dict)
    registered: list[str] = field(default_factory=list)

    def skip(self, reason: Rejection, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count


@dataclass(frozen=True, slots=True)
class Reply:
    """A device's answer to a command (``PREFIX/ID/replies``)."""

    device_id: str
    command_id: str
    ok: bool
    received_at: float
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CommandToSend:
    """A claimed command, with what the device needs to judge it."""

    id: str
    device_id: str
    name: str
    params: dict[str, Any]
    created_at: float
    expires_at: float


@dataclass(slots=True)
class ReplyResult:
    events: list[EventRecord] = field(default_factory=list)
    unknown: int = 0
    late: int = 0
