"""Writes to the registry and history. Keyword-only, typed, and each call is one transaction."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from devices import bulk, rollups
from devices.alerts import alert_events, not_acknowledged, unacknowledged_alerts
from devices.identifiers import is_command_name, is_device_id
from devices.models import Acknowledgement, ApiToken, BridgeHeartbeat, Command, Device, Event, Lease
from devices.permissions import DeviceAccess
from devices.records import (
    CommandToSend,
    EventKind,
    EventRecord,
    IngestResult,
    Observation,
    Rejection,
    Reply,
    ReplyResult,
)

# Any constant will do: it names the transaction-scoped PostgreSQL lock that serializes event-id assignment (public:
# the fault tests hold it to stop a bridge inside an ingest transaction).
EVENT_ID_LOCK = 7_349_210_000_001
_PURGE_CHUNK = 5000

DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)
"""What Django raises when the database is away (down, restarting, the connection lost) rather than refusing a
statement: the callers wait and retry, or answer "unavailable"."""


def lock_event_ids() -> None:
    """Serialize writers of events so that ids become visible in id order (contract section 4).

    SQLite needs nothing here: its connections open IMMEDIATE transactions (settings), one writer at a time.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [EVENT_ID_LOCK])


def ingest(*, observations: Sequence[Observation], auto_register: bool, max_devices: int) -> IngestResult:
    """Store a batch of observations in one transaction and update each device's presence and latest values.

    Auto-registers unknown devices (up to ``max_devices``), drops a ``(device, seq)`` already stored, and records
    nothing for a status equal to the stored one. Returns the stored events in id order. The statements are in
    ``devices.bulk`` (the hot path, written by hand).
    """
    result = IngestResult()
    if not observations:
        return result
    with transaction.atomic():
        lock_event_ids()
        devices = _devices_for(observations, auto_register=auto_register, max_devices=max_devices, result=result)
        seen = bulk.stored_seqs(list({(obs.device_id, obs.seq) for obs in observations if obs.seq is not None}))
        rows: list[bulk.EventRow] = []
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
            device.changed = True
            rows.append(bulk.EventRow(obs.device_id, obs.kind, obs.received_at, obs.device_ts, obs.seq, obs.body))
        ids = bulk.insert_events(rows)
        bulk.save_device_states(device for device in devices.values() if device.changed)
        telemetry = (row for row in rows if row.kind is EventKind.TELEMETRY)
        rollups.merge(rollups.of_telemetry((row.device_id, row.ts, row.body) for row in telemetry))
    result.stored = [
        EventRecord(id=id_, device_id=row.device_id, kind=row.kind, ts=row.ts, body=row.body, device_ts=row.device_ts)
        for id_, row in zip(ids, rows, strict=True)
    ]
    return result


def _devices_for(
    observations: Sequence[Observation], *, auto_register: bool, max_devices: int, result: IngestResult
) -> dict[str, bulk.DeviceState]:
    wanted = list(dict.fromkeys(obs.device_id for obs in observations))
    devices = bulk.device_states(wanted)
    missing = [device_id for device_id in wanted if device_id not in devices]
    if missing and auto_register:
        room = max(0, max_devices - Device.objects.count())
        new = [Device(id=device_id) for device_id in missing[:room]]
        Device.objects.bulk_create(new)
        for device in new:
            devices[device.id] = bulk.DeviceState(
                id=device.id, online=False, status_changed_at=None, last_seen=None, latest={}, latest_ts=None
            )
        result.registered = [device.id for device in new]
    return devices


def _apply(device: bulk.DeviceState, obs: Observation) -> bool:
    """Fold one observation into the device's state; False when it changes nothing worth storing."""
    if obs.kind is EventKind.STATUS:
        online = bool(obs.body["online"])
        if device.online == online and device.status_changed_at is not None:
            return False
        device.online = online
        device.status_changed_at = datetime.fromtimestamp(obs.received_at, tz=UTC)
        if online:
            device.seen = obs.received_at
        return True
    device.seen = obs.received_at
    if obs.kind is EventKind.TELEMETRY:
        device.latest.update(obs.body["values"])
        device.latest_ts = obs.received_at
    return True


def purge_history(*, older_than: float) -> int:
    """Delete events received before ``older_than`` (unix seconds), in chunks, with their acknowledgements and the
    telemetry rollups of the hours before it; returns how many events."""
    total = 0
    while True:
        with transaction.atomic():
            ids = list(
                Event.objects.filter(ts__lt=older_than).order_by("id").values_list("id", flat=True)[:_PURGE_CHUNK]
            )
            if not ids:
                Acknowledgement.objects.filter(event_ts__lt=older_than).delete()
                rollups.purge(older_than=older_than)
                return total
            Event.objects.filter(id__in=ids).delete()
        total += len(ids)


def record_bridge_heartbeat(*, name: str, connected: bool, detail: str = "") -> None:
    BridgeHeartbeat.objects.update_or_create(
        name=name, defaults={"connected": connected, "detail": detail[:300], "updated_at": timezone.now()}
    )


def hold_lease(*, name: str, owner: str, ttl: float) -> bool:
    """Take or renew the role ``name`` for ``owner`` for ``ttl`` seconds; False while another owner holds it.

    One conditional UPDATE (or the first INSERT) decides, so two bridges racing for a lapsed lease cannot both win.
    """
    now = timezone.now()
    until = now + timedelta(seconds=ttl)
    with transaction.atomic():
        taken = Lease.objects.filter(Q(owner=owner) | Q(until__lt=now), name=name).update(owner=owner, until=until)
        if taken:
            return True
        if Lease.objects.filter(name=name).exists():
            return False
        try:
            with transaction.atomic():
                Lease.objects.create(name=name, owner=owner, until=until)
        except IntegrityError:
            return False  # another owner created it first
        return True


def release_lease(*, name: str, owner: str) -> None:
    """Give the role up at once (on a clean stop), so another bridge need not wait for it to lapse."""
    Lease.objects.filter(name=name, owner=owner).delete()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token(*, user: User, name: str = "") -> str:
    """Create an API token for ``user`` and return it; only its hash is kept."""
    token = "gw_" + secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name=name, prefix=token[:8], key_hash=hash_token(token))
    return token


def touch_token(*, token_id: int) -> None:
    """Record that a token was used (at most once a minute, to keep writes off the hot path)."""
    now = timezone.now()
    ApiToken.objects.filter(id=token_id).exclude(last_used__gt=now - timedelta(minutes=1)).update(last_used=now)


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


# --- Commands (contract section 2) ----------------------------------------------------------------------------

COMMAND_IDEMPOTENCY = timedelta(hours=24)
COMMAND_ENVELOPE = 160  # bytes around the params in the published payload (id, ts, expires, ttl)
OFFLINE_REJECT = "reject"
OFFLINE_HOLD = "hold"


class CommandRefused(ValueError):
    """A command that cannot even be stored (unknown device, malformed request). ``code`` is the error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    command: Command
    created: bool
    events: list[EventRecord]


def _command_event(command: Command, *, at: float) -> Event:
    body: dict[str, Any] = {"command_id": command.id, "name": command.name, "state": command.state}
    if command.result is not None:
        body["result"] = command.result
    if command.error:
        body["error"] = command.error
    if command.request_id:
        body["request_id"] = command.request_id
    return Event(device_id=command.device_id, kind=EventKind.COMMAND.value, ts=at, body=body)


def _store_command_events(commands: Iterable[Command], at: float) -> list[EventRecord]:
    rows = [_command_event(command, at=at) for command in commands]
    Event.objects.bulk_create(rows)
    return [
        EventRecord(id=row.id, device_id=row.device_id, kind=EventKind.COMMAND, ts=row.ts, body=row.body)
        for row in rows
    ]


def request_command(
    *,
    user: User,
    access: DeviceAccess,
    device_id: str,
    name: str,
    params: object,
    request_id: str | None,
    timeout: float,
    offline_policy: str,
    max_payload: int,
    commands_per_minute: int | None = None,
) -> CommandOutcome:
    """Store an operator's command as pending (or rejected), or return the one with the same ``request_id``.

    Stores it as rejected when the user may only view the device (``forbidden``), has sent ``commands_per_minute``
    commands in the last minute (``rate_limited``), or the device is offline under the reject policy
    (``device_offline``). Raises ``CommandRefused`` for what cannot be stored: a device the user may not view (the
    same error as an unknown one), a bad name, params that are not a JSON object or too large, a bad timeout.
    """
    if not is_device_id(device_id) or not access.can_view(device_id):
        raise CommandRefused("unknown_device", f"unknown device {device_id!r}")
    if not is_command_name(name):
        raise CommandRefused("bad_command", f"invalid command name {name!r}: 1-64 of A-Z a-z 0-9 _ -")
    if not isinstance(params, dict):
        raise CommandRefused("bad_command", f"params must be a JSON object, got {type(params).__name__}")
    _check_plain_json(params, "params")
    size = len(json.dumps(params, ensure_ascii=False).encode()) + COMMAND_ENVELOPE
    if size > max_payload:
        raise CommandRefused("too_large", f"command payload of {size} bytes would exceed {max_payload}")
    if request_id is not None and (
        not isinstance(request_id, str) or not 1 <= len(request_id) <= 100 or "\x00" in request_id
    ):
        raise CommandRefused("bad_command", "request_id must be a string of 1-100 characters without NUL")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= 3600:
        raise CommandRefused("bad_command", f"timeout {timeout!r} must be a number of seconds from 1 to 3600")
    now = timezone.now()
    with transaction.atomic():
        lock_event_ids()
        device = Device.objects.filter(id=device_id).first()
        if device is None:
            raise CommandRefused("unknown_device", f"unknown device {device_id!r}")
        if request_id is not None:
            existing = Command.objects.filter(
                requested_by=user, request_id=request_id, created_at__gte=now - COMMAND_IDEMPOTENCY
            ).first()
            if existing is not None:
                return CommandOutcome(command=existing, created=False, events=[])
        command = Command(
            id=uuid.uuid4().hex,
            device=device,
            name=name,
            params=params,
            requested_by=user,
            request_id=request_id or "",
            created_at=now,
            expires_at=now + timedelta(seconds=float(timeout)),
            timeout=float(timeout),
        )
        if not access.can_operate(device_id):
            _finish(command, Command.State.REJECTED, error="forbidden", at=now)
        elif commands_per_minute is not None and (
            Command.objects.filter(requested_by=user, created_at__gte=now - timedelta(minutes=1)).count()
            >= commands_per_minute
        ):
            _finish(command, Command.State.REJECTED, error="rate_limited", at=now)
        elif not device.online and offline_policy == OFFLINE_REJECT:
            _finish(command, Command.State.REJECTED, error="device_offline", at=now)
        command.save(force_insert=True)
        events = _store_command_events([command], now.timestamp())
    return CommandOutcome(command=command, created=True, events=events)


COMMAND_PARAMS_DEPTH = 32
_INT_RANGE = (-(2**63), 2**64 - 1)  # what the MQTT side's encoder (orjson) accepts


def _check_plain_json(value: object, where: str, depth: int = 0) -> None:
    """Params must survive every store and encoder on the way to the device: bounded depth, finite numbers,
    64-bit integers, and no NUL (PostgreSQL's jsonb refuses it)."""
    if depth > COMMAND_PARAMS_DEPTH:
        raise CommandRefused("bad_command", f"{where} is nested more than {COMMAND_PARAMS_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or "\x00" in key:
                raise CommandRefused("bad_command", f"{where} has a key that is not a string without NUL")
            _check_plain_json(item, f"{where}.{key[:40]}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain_json(item, f"{where}[{index}]", depth + 1)
    elif isinstance(value, str):
        if "\x00" in value:
            raise CommandRefused("bad_command", f"{where} contains NUL")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise CommandRefused("bad_command", f"{where} is an integer outside 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CommandRefused("bad_command", f"{where} is not a finite number")
    else:
        raise CommandRefused("bad_command", f"{where} is not JSON ({type(value).__name__})")


def fail_command(*, command_id: str, error: str) -> list[EventRecord]:
    """A command that cannot be published at all (should not happen: requests are validated) ends as failed."""

    def fail(command: Command, now: datetime) -> list[str]:
        _finish(command, Command.State.FAILED, at=now, error=error)
        return _FINAL_FIELDS

    return _move_pending(command_id, fail)


def _move_pending(command_id: str, change: Callable[[Command, datetime], list[str]]) -> list[EventRecord]:
    """Apply ``change`` to a command that is still pending, save the fields it names, record the new state."""
    now = timezone.now()
    with transaction.atomic():
        lock_event_ids()
        command = Command.objects.filter(id=command_id, state=Command.State.PENDING).first()
        if command is None:
            return []  # it moved on meanwhile (a reply, the sweeper)
        command.save(update_fields=change(command, now))
        return _store_command_events([command], now.timestamp())


_FINAL_FIELDS = ["state", "finished_at", "error", "result", "lease_owner", "lease_until"]


def _finish(command: Command, state: str, *, at: datetime, error: str = "", result: Any = None) -> None:
    command.state = state
    command.finished_at = at
    command.error = error[:1024]
    command.result = result
    command.lease_owner = ""
    command.lease_until = None


def claim_commands(*, owner: str, lease: float, limit: int, hold_offline: bool) -> list[CommandToSend]:
    """Claim pending commands whose lease is free or lapsed, for ``owner`` to publish (one bridge per command)."""
    now = timezone.now()
    with transaction.atomic():
        candidates = Command.objects.filter(state=Command.State.PENDING, expires_at__gt=now).filter(
            Q(lease_until__isnull=True) | Q(lease_until__lt=now)
        )
        if hold_offline:
            candidates = candidates.filter(device__online=True)
        if connection.features.has_select_for_update_skip_locked:
            candidates = candidates.select_for_update(skip_locked=True, of=("self",))
        claimed = list(candidates.order_by("created_at")[:limit])
        if not claimed:
            return []
        Command.objects.filter(id__in=[c.id for c in claimed]).update(
            lease_owner=owner, lease_until=now + timedelta(seconds=lease), attempts=F("attempts") + 1
        )
    return [command_to_send(command) for command in claimed]


def command_to_send(command: Command) -> CommandToSend:
    """What a bridge needs to publish a stored command."""
    return CommandToSend(
        id=command.id,
        device_id=command.device_id,
        name=command.name,
        params=command.params,
        created_at=command.created_at.timestamp(),
        expires_at=command.expires_at.timestamp(),
    )


def mark_sent(*, command_id: str, owner: str) -> list[EventRecord]:
    """The broker acknowledged the publish: pending -> sent (nothing if the command moved on meanwhile)."""

    def sent(command: Command, now: datetime) -> list[str]:
        command.state = Command.State.SENT
        command.sent_at = now
        command.lease_owner = owner
        return ["state", "sent_at", "lease_owner"]

    return _move_pending(command_id, sent)


def release_claim(*, command_id: str) -> None:
    """A publish failed: let any bridge claim the command again at once."""
    Command.objects.filter(id=command_id, state=Command.State.PENDING).update(lease_until=None)


def record_replies(*, replies: Sequence[Reply]) -> ReplyResult:
    """Match device replies to commands by id (any bridge may receive them). A reply after the final state is kept
    as ``late_reply`` and changes nothing; a reply for an unknown id (or another device's) is counted."""
    result = ReplyResult()
    if not replies:
        return result
    now = timezone.now()
    with transaction.atomic():
        lock_event_ids()
        commands = {c.id: c for c in Command.objects.filter(id__in=[r.command_id for r in replies])}
        finished: list[Command] = []
        for reply in replies:
            command = commands.get(reply.command_id)
            if command is None or command.device_id != reply.device_id:
                result.unknown += 1
                continue
            if command.state in Command.FINAL_STATES:
                result.late += 1
                command.late_reply = {
                    "ok": reply.ok,
                    "result": reply.result,
                    "error": reply.error,
                    "at": reply.received_at,
                }
                command.save(update_fields=["late_reply"])
                continue
            state = Command.State.SUCCEEDED if reply.ok else Command.State.FAILED
            _finish(command, state, at=now, error=reply.error or ("" if reply.ok else "failed"), result=reply.result)
            command.save(update_fields=_FINAL_FIELDS)
            finished.append(command)
        result.events = _store_command_events(finished, now.timestamp())
    return result


def expire_commands(
    *, command_ids: Collection[str] = (), overdue_before: datetime | None = None, held: Collection[str] = ()
) -> list[EventRecord]:
    """Give overdue commands their final state: ``expired`` if never or surely sent without a reply, ``failed``
    with ``outcome_unknown`` if a publish was started but never confirmed (a crash in between).

    ``command_ids`` are overdue by a bridge's monotonic clock; ``overdue_before`` catches the rest by wall clock,
    except the ``held`` ones (the calling bridge runs their deadlines on its monotonic clock).
    """
    now = timezone.now()
    with transaction.atomic():
        lock_event_ids()
        due = Command.objects.filter(state__in=[Command.State.PENDING, Command.State.SENT])
        selector = Q(id__in=list(command_ids)) if command_ids else Q(pk__in=[])
        if overdue_before is not None:
            selector |= Q(expires_at__lt=overdue_before) & ~Q(id__in=list(held))
        finished = []
        for command in due.filter(selector):
            if command.state == Command.State.PENDING and command.attempts > 0 and command.sent_at is None:
                _finish(command, Command.State.FAILED, at=now, error="outcome_unknown")
            else:
                _finish(command, Command.State.EXPIRED, at=now, error="no reply before the deadline")
            command.save(update_fields=_FINAL_FIELDS)
            finished.append(command)
        return _store_command_events(finished, now.timestamp())


# --- Devices and alerts over the HTTP API (issue 6) -------------------------------------------------------------


class AccessRefused(ValueError):
    """An operation on devices the user may not perform: ``unknown_device`` for a device that does not exist or
    that the user may not view (one answer for both), ``forbidden`` for one the user may view but not operate."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_operable(*, access: DeviceAccess, device_ids: Collection[str]) -> None:
    """Raise ``AccessRefused`` for the first of ``device_ids`` the user may not operate (or that does not exist)."""
    wanted = list(dict.fromkeys(device_ids))
    valid = [device_id for device_id in wanted if is_device_id(device_id) and access.can_view(device_id)]
    existing = set(Device.objects.filter(id__in=valid).values_list("id", flat=True))
    for device_id in wanted:
        if device_id not in existing:
            raise AccessRefused("unknown_device", f"unknown device {device_id[:100]!r}")
        if not access.can_operate(device_id):
            raise AccessRefused("forbidden", f"you may view device {device_id!r} but not operate it")


def delete_device(*, access: DeviceAccess, device_id: str) -> None:
    """Delete a device the user may operate, with its history, commands and acknowledgements.

    Nothing references events, so Django deletes them with one DELETE instead of loading them. A device that keeps
    publishing is registered again by its next message (when auto-registration is on)."""
    with transaction.atomic():
        check_operable(access=access, device_ids=[device_id])
        Device.objects.filter(id=device_id).delete()


def acknowledge_alerts(
    *, user: User, access: DeviceAccess, device_ids: Collection[str], event_ids: Collection[int] | None, now: float
) -> int:
    """Record ``user``'s acknowledgement of the unacknowledged warning and critical events of devices they may
    operate: the ones of ``event_ids`` among them, or when ``None`` every current alert (the last hour's).
    Returns how many were acknowledged now; ids that are not such events, or already acknowledged, are skipped."""
    with transaction.atomic():
        check_operable(access=access, device_ids=device_ids)
        if event_ids is None:
            pending = unacknowledged_alerts(now=now)
        else:
            pending = not_acknowledged(alert_events().filter(id__in=list(event_ids)))
        pending = pending.filter(device_id__in=list(device_ids))
        at = datetime.fromtimestamp(now, tz=UTC)
        rows = [
            Acknowledgement(event_id=event_id, device_id=device, event_ts=ts, acknowledged_by=user, acknowledged_at=at)
            for event_id, device, ts in pending.values_list("id", "device_id", "ts")
        ]
        # A concurrent acknowledgement of the same event keeps the first row (who acknowledged it first).
        Acknowledgement.objects.bulk_create(rows, ignore_conflicts=True)
    return len(rows)
