"""The statements of the ingest path, written by hand for SQLite and PostgreSQL.

``services.ingest`` stores every message the bridge receives, so its statements are the gateway's hottest code. The
ORM's ``bulk_create`` and a ``Device`` instance per row cost more there than the database itself (a model instance and
``get_db_prep_save`` per field and row, the standard library's JSON encoder, ...): on SQLite ingest took ~100 us per
message with them and ~40 without. The statements here bind plain values, encode JSON with orjson, and read devices as
``DeviceState`` records, not model instances. Table and column names come from the models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from django.db import NotSupportedError, connection

from devices.models import Device, Event
from devices.records import EventKind

_CHUNK = 500  # rows per statement on SQLite: 6 parameters a row stays well under its limit of 32,766


@dataclass(slots=True)
class DeviceState:
    """What ingest reads and writes of one device: presence and latest values."""

    id: str
    online: bool
    status_changed_at: datetime | None
    last_seen: datetime | None
    latest: dict[str, Any]
    latest_ts: float | None
    seen: float | None = None  # a newer last_seen, as unix time: made a datetime once per device, when saved
    changed: bool = field(default=False, compare=False)

    def last_seen_now(self) -> datetime | None:
        return self.last_seen if self.seen is None else datetime.fromtimestamp(self.seen, tz=UTC)


@dataclass(frozen=True, slots=True)
class EventRow:
    device_id: str
    kind: EventKind
    ts: float
    device_ts: float | None
    seq: int | None
    body: dict[str, Any]


def _postgres() -> bool:
    if connection.vendor == "postgresql":
        return True
    if connection.vendor == "sqlite":
        return False
    raise NotSupportedError(f"the ingest statements are written for SQLite and PostgreSQL, not {connection.vendor}")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(value: Any) -> dict[str, Any]:
    """A JSON column's value: text on SQLite, already decoded by psycopg on PostgreSQL."""
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        decoded = orjson.loads(value)
        return decoded if isinstance(decoded, dict) else {}
    return value if isinstance(value, dict) else {}


def _datetime(value: Any) -> datetime | None:
    """A datetime column's value as an aware datetime (SQLite hands back naive UTC, or text)."""
    if value is None or (isinstance(value, datetime) and value.tzinfo is not None):
        return value
    return connection.ops.convert_datetimefield_value(value, None, connection)  # type: ignore[attr-defined,no-any-return]


# Columns of the rows PostgreSQL reads from one JSON document (``json_rows``).
_DEVICE_STATE = (
    "id text, last_seen timestamptz, online boolean, status_changed_at timestamptz, latest jsonb, latest_ts float8"
)
_EVENT = "device_id text, kind text, ts float8, device_ts float8, seq bigint, body jsonb"
_SEQ = "device_id text, seq bigint"


def json_rows(columns: str) -> str:
    """A ``FROM`` item ``r`` (PostgreSQL) holding the rows of one parameter: a JSON array of arrays, written by
    ``json_param``, each in the order of ``columns`` (``"name type, ..."``).

    One document encoded by orjson instead of array parameters, which psycopg escapes element by element in Python
    (as ``VALUES`` placeholders, binding a batch's rows took longer than storing them)."""
    fields, names = [], []
    for index, column in enumerate(columns.split(", ")):
        name, kind = column.split(" ", 1)
        fields.append(f"(j->{index})::jsonb" if kind == "jsonb" else f"(j->>{index})::{kind}")
        names.append(name)
    return f"(SELECT {', '.join(fields)} FROM json_array_elements(%s::json) AS j) AS r({', '.join(names)})"  # noqa: S608 (names from this module)


def json_param(rows: Iterable[Sequence[Any]]) -> str:
    """``rows`` (tuples in a ``json_rows`` order) as its one parameter."""
    return _json(list(rows))


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def device_states(ids: Sequence[str]) -> dict[str, DeviceState]:
    """The ``DeviceState`` of each device of ``ids`` that exists."""
    if not ids:
        return {}
    table = _q(Device._meta.db_table)
    columns = "id, online, status_changed_at, last_seen, latest, latest_ts"
    found: dict[str, DeviceState] = {}
    with connection.cursor() as cursor:
        if _postgres():
            cursor.execute(f"SELECT {columns} FROM {table} WHERE id = ANY(%s)", [list(ids)])  # noqa: S608
            rows = cursor.fetchall()
        else:
            rows = []
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ", ".join(["%s"] * len(chunk))
                cursor.execute(f"SELECT {columns} FROM {table} WHERE id IN ({marks})", list(chunk))  # noqa: S608
                rows.extend(cursor.fetchall())
    for device_id, online, changed_at, last_seen, latest, latest_ts in rows:
        found[device_id] = DeviceState(
            id=device_id,
            online=bool(online),
            status_changed_at=_datetime(changed_at),
            last_seen=_datetime(last_seen),
            latest=_loads(latest),
            latest_ts=latest_ts,
        )
    return found


def save_device_states(states: Iterable[DeviceState]) -> None:
    """Write back the presence and latest values of ``states`` in one statement (PostgreSQL) or one prepared UPDATE
    run over all of them (SQLite)."""
    table = _q(Device._meta.db_table)
    if _postgres():
        rows = [(s.id, s.last_seen_now(), s.online, s.status_changed_at, s.latest, s.latest_ts) for s in states]
        if rows:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {table} AS d SET last_seen = r.last_seen, online = r.online, "  # noqa: S608
                    "status_changed_at = r.status_changed_at, latest = r.latest, latest_ts = r.latest_ts "
                    f"FROM {json_rows(_DEVICE_STATE)} WHERE d.id = r.id",
                    [json_param(rows)],
                )
        return
    adapt = connection.ops.adapt_datetimefield_value
    params = [
        [adapt(s.last_seen_now()), s.online, adapt(s.status_changed_at), _json(s.latest), s.latest_ts, s.id]
        for s in states
    ]
    if params:
        with connection.cursor() as cursor:
            cursor.executemany(
                f"UPDATE {table} SET last_seen = %s, online = %s, status_changed_at = %s, latest = %s, "  # noqa: S608
                "latest_ts = %s WHERE id = %s",
                params,
            )


def insert_events(rows: Sequence[EventRow]) -> list[int]:
    """Insert ``rows`` in order; returns their ids, in the same order."""
    if not rows:
        return []
    table = _q(Event._meta.db_table)
    columns = "device_id, kind, ts, device_ts, seq, body"
    ids: list[int] = []
    with connection.cursor() as cursor:
        if _postgres():
            cursor.execute(
                f"INSERT INTO {table} ({columns}) SELECT * FROM {json_rows(_EVENT)} RETURNING id",  # noqa: S608
                [json_param((r.device_id, r.kind.value, r.ts, r.device_ts, r.seq, r.body) for r in rows)],
            )
            ids.extend(found for (found,) in cursor.fetchall())
            return ids
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            marks = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(chunk))
            values: list[Any] = [
                value
                for row in chunk
                for value in (row.device_id, row.kind.value, row.ts, row.device_ts, row.seq, _json(row.body))
            ]
            cursor.execute(f"INSERT INTO {table} ({columns}) VALUES {marks} RETURNING id", values)  # noqa: S608
            ids.extend(found for (found,) in cursor.fetchall())
    return ids


def stored_seqs(pairs: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which ``(device id, seq)`` of ``pairs`` are already stored: one index lookup per pair, whatever the table's
    size (tests/devices/test_bulk.py checks the plans)."""
    if not pairs:
        return set()
    table = _q(Event._meta.db_table)
    found: set[tuple[str, int]] = set()
    with connection.cursor() as cursor:
        if _postgres():
            cursor.execute(
                f"SELECT e.device_id, e.seq FROM {json_rows(_SEQ)} JOIN {table} AS e "  # noqa: S608
                "ON e.device_id = r.device_id AND e.seq = r.seq",
                [json_param(pairs)],
            )
            found.update(cursor.fetchall())
            return found
        for start in range(0, len(pairs), _CHUNK):
            chunk = pairs[start : start + _CHUNK]
            values = ", ".join(["(%s, %s)"] * len(chunk))
            # A join, not ``(device_id, seq) IN (VALUES ...)``: SQLite scans the whole table for that one.
            query = (
                f"SELECT e.device_id, e.seq FROM (VALUES {values}) AS v JOIN {table} AS e "  # noqa: S608
                "ON e.device_id = v.column1 AND e.seq = v.column2"
            )
            cursor.execute(query, [item for pair in chunk for item in pair])
            found.update((device_id, seq) for device_id, seq in cursor.fetchall())
    return found
