"""The shapes the HTTP API takes and returns: what ``/api/openapi.json`` documents and what responses are checked
against. Event frames are the WebSocket's (contract section 3), so they stay open objects here."""

from __future__ import annotations

from typing import Annotated, Any

from ninja import Schema
from pydantic import Field, WithJsonSchema

from devices.identifiers import COMMAND_NAME_RE, DEVICE_ID_RE

Frame = dict[str, Any]

# Names the gateway checks itself (devices.identifiers): the schema documents the grammar, the gateway's own check
# answers a bad one (404 unknown_device, 400 bad_command), as it does over the WebSocket.
DEVICE_ID_SCHEMA = {"type": "string", "pattern": f"^{DEVICE_ID_RE.pattern}$"}
DocumentedDeviceId = Annotated[str, WithJsonSchema(DEVICE_ID_SCHEMA)]

# Ids and counters the databases store as 64-bit integers: larger values would fail there, not here.
BigId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class Error(Schema):
    error: str = Field(description="A stable code: bad_request, unauthenticated, csrf_failed, forbidden, ...")
    message: str = Field(description="What was wrong, naming the offending parameter or value.")


class Device(Schema):
    id: str
    name: str
    kind: str
    online: bool
    last_seen: float | None = Field(description="Unix seconds of the last message from the device.")
    status_changed_at: float | None = Field(description="Unix seconds of the last online/offline change.")
    latest: dict[str, Any] = Field(description="The latest value of each metric.")
    latest_ts: float | None = Field(description="Receive time of the latest telemetry.")
    fleets: list[str] = Field(description="Names of the fleets the device belongs to.")
    alerting: bool = Field(description="Whether the device has an alert now (``alerts`` > 0).")
    alerts: int = Field(description="Unacknowledged warning and critical events of the last hour.")


class Counts(Schema):
    online: int
    offline: int
    alerting: int


class DeviceList(Schema):
    devices: list[Device]
    total: int = Field(description="Devices matching the filters (all pages).")
    counts: Counts = Field(description="Over every device the user may see, whatever the filters.")
    last_id: int


class DeviceDetail(Schema):
    device: Device
    events: list[Frame] = Field(description="The device's 50 newest event frames of every kind, newest first.")
    commands: list[Frame] = Field(description="The latest command frame of each recent command, newest first.")
    last_id: int


class Series(Schema):
    bucket: float | None = Field(description="Bucket width in seconds, or null for raw points.")
    t: list[float] = Field(description="Bucket start (or the event's time for raw points), unix seconds.")
    min: list[float]
    max: list[float]
    mean: list[float]
    count: list[int]


class Telemetry(Schema):
    device: str
    start: float
    end: float
    bucket: float | None = Field(description="Bucket width if any series is aggregated, else null.")
    series: dict[str, Series]
    last_id: int


class Events(Schema):
    events: list[Frame] = Field(description="``event`` frames, newest first, each with its ``acknowledged``.")
    last_id: int


class AckRequest(Schema):
    event_ids: list[BigId] | None = Field(
        default=None, max_length=1000, description="Only these events (default: every current alert)."
    )


class Ack(Schema):
    acknowledged: int = Field(description="Events acknowledged by this request.")
    device: Device


class AlertsAckRequest(Schema):
    devices: list[DocumentedDeviceId] = Field(min_length=1, max_length=1000)


class AlertsAck(Schema):
    acknowledged: int
    devices: list[Device]


PARAMS_RULES = (
    "Plain JSON: at most 32 levels deep, finite numbers, integers within 64 bits, no NUL in keys or strings, "
    "and small enough for GATEWAY_MAX_PAYLOAD (else 400 bad_command or too_large)."
)


class CommandRequest(Schema):
    """``params``, ``request_id`` and ``timeout`` are checked by the gateway's command rules (errors ``bad_command``,
    ``too_large``), so their types here only document them."""

    device: DocumentedDeviceId
    name: Annotated[str, WithJsonSchema({"type": "string", "pattern": f"^{COMMAND_NAME_RE.pattern}$"})]
    params: Annotated[Any, WithJsonSchema({"type": "object", "description": PARAMS_RULES})] = None
    request_id: Annotated[Any, WithJsonSchema({"type": "string", "pattern": "^[^\\x00]{1,100}$"})] = None
    timeout: Annotated[Any, WithJsonSchema({"type": "number", "minimum": 1, "maximum": 3600})] = None


class Command(Schema):
    id: str
    device: str
    name: str
    params: dict[str, Any]
    state: str
    request_id: str | None
    requested_by: str | None
    created_at: str | None
    expires_at: str | None
    sent_at: str | None
    finished_at: str | None
    result: Any
    error: str | None
    late_reply: dict[str, Any] | None


class CommandCreated(Schema):
    command: Command
    last_event: Frame | None


class CommandDetail(Schema):
    command: Command
    last_event: Frame | None
    last_id: int


class CommandList(Schema):
    commands: list[Command]
    last_id: int
