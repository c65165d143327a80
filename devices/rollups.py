"""Hourly rollups of numeric telemetry: what makes a year of history about as quick to read as a day.

Every numeric telemetry value stored also counts in its ``(device, metric, hour)`` row of ``TelemetryRollup``: min,
max, sum and count. Ingest merges a batch's rollups in one statement (``merge``, SQL per database);
``devices.selectors.telemetry_series`` reads whole hours from them when the buckets asked for are an hour wide or
more. Data written around ingest (an import, the benchmark's bulk load) gets its rollups from ``rebuild``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django.db import NotSupportedError, connection
from django.db.models import Model, QuerySet

from devices import bulk
from devices.models import Event, TelemetryRollup
from devices.records import EventKind

HOUR = 3600
_MERGE_CHUNK = 500
_REBUILD_CHUNK = 5000

RollupKey = tuple[str, str, int]
"""``(device id, metric, hour)``, the hour as unix time // 3600."""


@dataclass(slots=True)
class Stats:
    """Min, max, sum and count of some values."""

    min: float
    max: float
    total: float
    count: int

    @classmethod
    def of(cls, value: float) -> Stats:
        return cls(min=value, max=value, total=value, count=1)

    def add(self, value: float) -> None:
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        self.total += value
        self.count += 1

    def merge(self, other: Stats) -> None:
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.total += other.total
        self.count += other.count


def hour_of(ts: float) -> int:
    return math.floor(ts / HOUR)


def numeric_values(body: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The metrics of a telemetry body that are charted: finite numbers, not booleans (as ``JsonNumber`` reads)."""
    values = body.get("values")
    if not isinstance(values, dict):
        return
    for name, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                yield name, number


def of_telemetry(rows: Iterable[tuple[str, float, Mapping[str, Any]]]) -> dict[RollupKey, Stats]:
    """The rollups of ``(device id, receive time, body)`` telemetry rows."""
    stats: dict[RollupKey, Stats] = {}
    for device_id, ts, body in rows:
        hour = hour_of(ts)
        for metric, value in numeric_values(body):
            key = (device_id, metric, hour)
            found = stats.get(key)
            if found is None:
                stats[key] = Stats.of(value)
            else:
                found.add(value)
    return stats


# The two spellings of "the smaller / larger of two values" in an upsert.
_EXTREMES = {"sqlite": ("MIN", "MAX"), "postgresql": ("LEAST", "GREATEST")}
_COLUMNS = ("device_id", "metric", "hour", "min", "max", "total", "count")
_PG_COLUMNS = "device_id text, metric text, hour bigint, min float8, max float8, total float8, count bigint"


def merge(stats: Mapping[RollupKey, Stats], *, model: type[Model] = TelemetryRollup) -> None:
    """Add ``stats`` to the stored rollups with ``INSERT ... ON CONFLICT DO UPDATE``, in key order (so that two
    writers lock rows in the same order). ``model`` is the rollup model (a migration passes its own).

    PostgreSQL gets one statement whose rows come from one JSON document (``bulk.json_rows``): the same rows as
    ``VALUES`` placeholders took twice as long as storing the batch's events (binding 7 parameters per row). SQLite
    gets ``VALUES``, 500 rows per statement (under its parameter limit), which costs it a few milliseconds.
    """
    extremes = _EXTREMES.get(connection.vendor)
    if extremes is None:
        raise NotSupportedError(f"rollups are written for SQLite and PostgreSQL, not {connection.vendor}")
    if not stats:
        return
    least, greatest = extremes
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    names = ", ".join(quote(column) for column in _COLUMNS)
    low, high, total, count = (quote(column) for column in _COLUMNS[3:])
    upsert = (
        f"ON CONFLICT ({quote('device_id')}, {quote('metric')}, {quote('hour')}) DO UPDATE SET "
        f"{low} = {least}({table}.{low}, excluded.{low}), {high} = {greatest}({table}.{high}, excluded.{high}), "
        f"{total} = {table}.{total} + excluded.{total}, {count} = {table}.{count} + excluded.{count}"
    )
    # Sorted on PostgreSQL, where writers lock rows; SQLite has one writer at a time.
    items = sorted(stats.items()) if connection.vendor == "postgresql" else stats.items()
    rows = [(*key, found.min, found.max, found.total, found.count) for key, found in items]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"INSERT INTO {table} ({names}) SELECT * FROM {bulk.json_rows(_PG_COLUMNS)} {upsert}",  # noqa: S608
                [bulk.json_param(rows)],
            )
            return
        for start in range(0, len(rows), _MERGE_CHUNK):
            chunk = rows[start : start + _MERGE_CHUNK]
            placeholders = ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(chunk))
            cursor.execute(
                f"INSERT INTO {table} ({names}) VALUES {placeholders} {upsert}",  # noqa: S608 (names from the model)
                [value for row in chunk for value in row],
            )


def rebuild(*, device_ids: Iterable[str] | None = None) -> int:
    """Recompute the rollups of some devices (default: all) from their stored telemetry; returns how many events
    were read. For history written around ``services.ingest``; ingest keeps rollups current by itself."""
    rollups = TelemetryRollup.objects.all()
    events = Event.objects.filter(kind=EventKind.TELEMETRY.value)
    if device_ids is not None:
        wanted = list(device_ids)
        rollups = rollups.filter(device_id__in=wanted)
        events = events.filter(device_id__in=wanted)
    rollups.delete()
    return add_stored(events)


def add_stored(telemetry: QuerySet[Any], *, model: type[Model] = TelemetryRollup) -> int:
    """Merge the rollups of stored telemetry events, read in id order 5,000 at a time; returns how many were read.
    (Also run by the migration that created the rollups, with its historical models.)"""
    read = 0
    after = 0
    while True:
        rows = telemetry.filter(id__gt=after).order_by("id").values_list("id", "device_id", "ts", "body")
        chunk = list(rows[:_REBUILD_CHUNK])
        if not chunk:
            return read
        merge(of_telemetry((device_id, ts, body) for _, device_id, ts, body in chunk), model=model)
        read += len(chunk)
        after = chunk[-1][0]


def purge(*, older_than: float) -> None:
    """Delete the rollups of hours that end at or before ``older_than`` (the hour it falls in stays)."""
    TelemetryRollup.objects.filter(hour__lt=hour_of(older_than)).delete()
