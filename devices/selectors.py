"""Reads from the registry and history. Keyword-only and typed; no writes here."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.utils import timezone

from devices.models import ApiToken, BridgeHeartbeat, Command, Device, Event
from devices.permissions import DeviceAccess
from devices.records import EventKind, EventRecord
from devices.services import hash_token


def record_of(event: Event) -> EventRecord:
    return EventRecord(
        id=event.id,
        device_id=event.device_id,
        kind=EventKind(event.kind),
        ts=event.ts,
        body=event.body,
        device_ts=event.device_ts,
    )


def last_event_id() -> int:
    """The highest stored event id (0 when there is none). Read it *before* reading state (contract 4)."""
    return Event.objects.order_by("-id").values_list("id", flat=True).first() or 0


@dataclass(frozen=True, slots=True)
class Replay:
    """Events to resend, oldest first, and the id range that could not be replayed (``None`` if none).

    ``horizon`` is the last id committed before the query: nothing above it can be in ``events`` unless it was
    committed meanwhile, so a client's ``after`` beyond it says nothing about events still to come."""

    events: list[EventRecord]
    gap: tuple[int, int] | None
    horizon: int = 0


def events_after(*, after: int, device_ids: Collection[str] | None, limit: int) -> Replay:
    """The newest ``limit`` events after id ``after`` for those devices (all when ``None``), in id order.

    When more than ``limit`` exist, the oldest are left out and reported as a gap.
    """
    horizon = last_event_id()  # before the query (contract section 4: ids become visible in order)
    events: QuerySet[Event] = Event.objects.filter(id__gt=after)
    if device_ids is not None:
        if not device_ids:
            return Replay(events=[], gap=None, horizon=horizon)
        events = events.filter(device_id__in=list(device_ids))
    newest = list(events.order_by("-id")[: limit + 1])
    newest.reverse()
    gap_end = 0
    if len(newest) > limit:
        dropped = newest.pop(0)
        gap_end = newest[0].id - 1 if newest else dropped.id
    oldest = Event.objects.order_by("id").values_list("id", flat=True).first()
    if oldest is not None and oldest > after + 1:
        # Ids are never reused, so ids between ``after`` and the oldest stored one were purged (retention).
        gap_end = max(gap_end, oldest - 1)
    gap = (after + 1, gap_end) if gap_end > after else None
    return Replay(events=[record_of(event) for event in newest], gap=gap, horizon=horizon)


def visible_device_ids(*, access: DeviceAccess, candidates: Collection[str]) -> set[str]:
    """Those of ``candidates`` that exist and ``access`` may view."""
    allowed = [device_id for device_id in candidates if access.can_view(device_id)]
    return set(Device.objects.filter(id__in=allowed).values_list("id", flat=True))


def device_list(*, access: DeviceAccess) -> list[Device]:
    return list(access.filter(Device.objects.all()).order_by("id"))


def device_detail(*, access: DeviceAccess, device_id: str) -> Device | None:
    if not access.can_view(device_id):
        return None
    return Device.objects.filter(id=device_id).first()


def recent_events(*, device_id: str, limit: int = 50, kinds: Collection[EventKind] | None = None) -> list[EventRecord]:
    events = Event.objects.filter(device_id=device_id)
    if kinds is not None:
        events = events.filter(kind__in=[kind.value for kind in kinds])
    rows = list(events.order_by("-id")[:limit])
    return [record_of(row) for row in rows]


def user_for_token(*, token: str) -> User | None:
    """The active user an unrevoked API token belongs to, or ``None``."""
    found = token_record(token=token)
    return found.user if found is not None else None


def token_record(*, token: str) -> ApiToken | None:
    """The unrevoked token row (with its active user) for a presented token, or ``None``."""
    return (
        ApiToken.objects.select_related("user")
        .filter(key_hash=hash_token(token), revoked_at__isnull=True, user__is_active=True)
        .first()
    )


def valid_token_ids(*, token_ids: Collection[int]) -> set[int]:
    """Those of ``token_ids`` that are neither revoked nor owned by an inactive user."""
    return set(
        ApiToken.objects.filter(id__in=list(token_ids), revoked_at__isnull=True, user__is_active=True).values_list(
            "id", flat=True
        )
    )


@dataclass(frozen=True, slots=True)
class BridgeHealth:
    connected: list[str]
    stale_or_disconnected: list[str]

    @property
    def ok(self) -> bool:
        return bool(self.connected)


def bridge_health(*, max_age: float) -> BridgeHealth:
    """Which bridges reported a live broker connection within ``max_age`` seconds."""
    fresh_after = timezone.now() - timedelta(seconds=max_age)
    connected: list[str] = []
    other: list[str] = []
    for beat in BridgeHeartbeat.objects.all():
        (connected if beat.connected and beat.updated_at >= fresh_after else other).append(beat.name)
    return BridgeHealth(connected=connected, stale_or_disconnected=other)


def command_event(*, command_id: str, device_id: str) -> EventRecord | None:
    """The latest stored state change of a command (what a repeated request_id gets back)."""
    row = (
        Event.objects.filter(device_id=device_id, kind=EventKind.COMMAND.value, body__command_id=command_id)
        .order_by("-id")
        .first()
    )
    return record_of(row) if row is not None else None


def recent_commands(*, device_id: str, limit: int = 20) -> list[Command]:
    return list(
        Command.objects.filter(device_id=device_id).select_related("requested_by").order_by("-created_at")[:limit]
    )


def command_detail(*, access: DeviceAccess, command_id: str) -> Command | None:
    command = Command.objects.filter(id=command_id).select_related("requested_by").first()
    if command is None or not access.can_view(command.device_id):
        return None
    return command
