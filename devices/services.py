"""Writes to the registry and history. Keyword-only, typed, and each call is one transaction."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.db.models import Field
from django.utils import timezone

from devices.models import ApiToken, BridgeHeartbeat, Device, Event
from devices.records import EventKind, EventRecord, IngestResult, Observation, Rejection

# Any constant will do: it names the transaction-scoped PostgreSQL lock that serializes event-id assignment.
_EVENT_ID_LOCK = 7_349_210_000_001
_PURGE_CHUNK = 5000


def lock_event_ids() -> None:
    """Serialize writers of events so that ids become visible in id order (contract section 4).

    SQLite needs nothing here: its connections open IMMEDIATE transactions (settings), one writer at a time.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_EVENT_ID_LOCK])


def ingest(*, observations: Sequence[Observation], auto_register: bool, max_devices: int) -> IngestResult:
    """Store a batch of observations in one transaction and update each device's presence and latest values.

    Auto-registers unknown devices (up to ``max_devices``), drops a ``(device, seq)`` already stored, and records
    nothing for a status equal to the stored one. Returns the stored events in id order.
    """
    result = IngestResult()
    if not observations:
        return result
    with transaction.atomic():
        lock_event_ids()
        devices = _devices_for(observations, auto_register=auto_register, max_devices=max_devices, result=result)
        seen = _stored_seqs(observations)
        rows: list[Event] = []
        changed: dict[str, Device] = {}
        for obs in observations:
            device = devices.get(obs.device_id)
            if device is None:
                result.skip(Rejection.DEVICE_CAP if auto_register else Rejection.UNKNOWN_DEVICE)
                continue
            if obs.seq is not None:
                if (obs.device_id, obs.seq) in seen:
                    result.skip(Rejection.DUPLICATE)
                    continue
                seen.add((obs.device_id, obs.seq))
            if not _apply(device, obs):
                result.skip(Rejection.UNCHANGED_STATUS)
                continue
            changed[device.id] = device
            rows.append(
                Event(
                    device_id=obs.device_id,
                    kind=obs.kind.value,
                    ts=obs.received_at,
                    device_ts=obs.device_ts,
                    seq=obs.seq,
                    body=obs.body,
                )
            )
        Event.objects.bulk_create(rows, batch_size=500)
        _save_device_state(changed.values())
    result.stored = [
        EventRecord(
            id=row.id,
            device_id=row.device_id,
            kind=EventKind(row.kind),
            ts=row.ts,
            body=row.body,
            device_ts=row.device_ts,
        )
        for row in rows
    ]
    return result


def _devices_for(
    observations: Sequence[Observation], *, auto_register: bool, max_devices: int, result: IngestResult
) -> dict[str, Device]:
    wanted = list(dict.fromkeys(obs.device_id for obs in observations))
    devices = {device.id: device for device in Device.objects.filter(id__in=wanted)}
    missing = [device_id for device_id in wanted if device_id not in devices]
    if missing and auto_register:
        room = max(0, max_devices - Device.objects.count())
        new = [Device(id=device_id) for device_id in missing[:room]]
        Device.objects.bulk_create(new)
        for device in new:
            devices[device.id] = device
        result.registered = [device.id for device in new]
    return devices


_DEVICE_STATE_FIELDS = ("last_seen", "online", "status_changed_at", "latest", "latest_ts")


def _save_device_state(devices: Iterable[Device]) -> None:
    """One prepared UPDATE run for every changed device (``bulk_update`` builds a CASE per field and row, which
    cost more than everything else in ingest)."""
    fields = [cast("Field[Any, Any]", Device._meta.get_field(name)) for name in _DEVICE_STATE_FIELDS]
    table = connection.ops.quote_name(Device._meta.db_table)
    assignments = ", ".join(f"{connection.ops.quote_name(f.column)} = %s" for f in fields)
    params = [
        [f.get_db_prep_save(getattr(device, f.attname), connection) for f in fields] + [device.id] for device in devices
    ]
    if params:
        with connection.cursor() as cursor:
            cursor.executemany(f"UPDATE {table} SET {assignments} WHERE {connection.ops.quote_name('id')} = %s", params)  # noqa: S608 (names from the model, values as parameters)


def _stored_seqs(observations: Sequence[Observation]) -> set[tuple[str, int]]:
    """Which ``(device, seq)`` pairs of the batch are already stored (one indexed row-value lookup)."""
    pairs = list({(obs.device_id, obs.seq) for obs in observations if obs.seq is not None})
    if not pairs:
        return set()
    found: set[tuple[str, int]] = set()
    table = connection.ops.quote_name(Event._meta.db_table)
    for start in range(0, len(pairs), 400):
        chunk = pairs[start : start + 400]
        values = ", ".join(["(%s, %s)"] * len(chunk))
        query = f"SELECT device_id, seq FROM {table} WHERE (device_id, seq) IN (VALUES {values})"  # noqa: S608
        with connection.cursor() as cursor:
            cursor.execute(query, [item for pair in chunk for item in pair])
            found.update((device_id, seq) for device_id, seq in cursor.fetchall())
    return found


def _apply(device: Device, obs: Observation) -> bool:
    """Fold one observation into the device's state; False when it changes nothing worth storing."""
    at = datetime.fromtimestamp(obs.received_at, tz=UTC)
    if obs.kind is EventKind.STATUS:
        online = bool(obs.body["online"])
        if device.online == online and device.status_changed_at is not None:
            return False
        device.online = online
        device.status_changed_at = at
        if online:
            device.last_seen = at
        return True
    device.last_seen = at
    if obs.kind is EventKind.TELEMETRY:
        latest: dict[str, Any] = dict(device.latest or {})
        latest.update(obs.body["values"])
        device.latest = latest
        device.latest_ts = obs.received_at
    return True


def purge_history(*, older_than: float) -> int:
    """Delete events received before ``older_than`` (unix seconds), in chunks; returns how many."""
    total = 0
    while True:
        with transaction.atomic():
            ids = list(
                Event.objects.filter(ts__lt=older_than).order_by("id").values_list("id", flat=True)[:_PURGE_CHUNK]
            )
            if not ids:
                return total
            Event.objects.filter(id__in=ids).delete()
        total += len(ids)


def record_bridge_heartbeat(*, name: str, connected: bool, detail: str = "") -> None:
    BridgeHeartbeat.objects.update_or_create(
        name=name, defaults={"connected": connected, "detail": detail[:300], "updated_at": timezone.now()}
    )


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token(*, user: User, name: str = "") -> str:
    """Create an API token for ``user`` and return it; only its hash is kept."""
    token = "gw_" + secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name=name, prefix=token[:8], key_hash=hash_token(token))
    return token


def revoke_token(*, token_id: int) -> None:
    ApiToken.objects.filter(id=token_id, revoked_at__isnull=True).update(revoked_at=timezone.now())


def ensure_operator(*, username: str) -> str | None:
    """Create a superuser ``username`` with a generated password and return it; ``None`` if it exists."""
    user_model = get_user_model()
    if user_model._default_manager.filter(username=username).exists():
        return None
    password = secrets.token_urlsafe(12)
    user_model._default_manager.create_superuser(username=username, email="", password=password)
    return password
