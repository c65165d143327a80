"""The hand-written ingest statements (devices/bulk.py), on whichever database the suite runs."""

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from devices import bulk
from devices.models import Device, Event
from devices.records import EventKind

pytestmark = pytest.mark.django_db


def row(device: str, n: int, **body: object) -> bulk.EventRow:
    return bulk.EventRow(device, EventKind.TELEMETRY, 1000.0 + n, 999.5 + n if n % 2 else None, n, {"values": body})


def test_insert_events_returns_ids_in_row_order_and_stores_values_exactly():
    Device.objects.create(id="a")
    Device.objects.create(id="b")
    rows = [row("ab"[n % 2], n, t=n / 3, s='quote " and \\ and é', nested=None) for n in range(1200)]
    ids = bulk.insert_events(rows)
    assert ids == sorted(ids) and len(set(ids)) == 1200
    stored = {e.id: e for e in Event.objects.all()}
    for id_, expected in zip(ids, rows, strict=True):
        event = stored[id_]
        assert (event.device_id, event.kind, event.ts, event.device_ts, event.seq, event.body) == (
            expected.device_id,
            expected.kind.value,
            expected.ts,
            expected.device_ts,
            expected.seq,
            expected.body,
        )


def test_stored_seqs_finds_only_stored_pairs():
    Device.objects.create(id="a")
    bulk.insert_events([row("a", n) for n in range(3)])
    assert bulk.stored_seqs([("a", 1), ("a", 7), ("b", 1), ("a", 2)]) == {("a", 1), ("a", 2)}
    assert bulk.stored_seqs([]) == set()


def test_device_states_round_trip():
    at = datetime(2026, 12, 6, 12, 30, 15, 250000, tzinfo=UTC)
    Device.objects.create(id="a", online=True, status_changed_at=at, last_seen=at, latest={"t": 1}, latest_ts=5.0)
    Device.objects.create(id="b")
    states = bulk.device_states(["a", "b", "missing"])
    assert set(states) == {"a", "b"}
    a = states["a"]
    assert (a.online, a.status_changed_at, a.last_seen, a.latest, a.latest_ts) == (True, at, at, {"t": 1}, 5.0)
    assert (states["b"].online, states["b"].last_seen, states["b"].latest) == (False, None, {})
    later = datetime(2026, 12, 6, 13, 0, tzinfo=UTC)
    a.online, a.last_seen, a.latest, a.latest_ts = False, later, {"t": 2, "s": "x", "n": None}, 6.5
    bulk.save_device_states([a])
    device = Device.objects.get(id="a")
    assert (device.online, device.last_seen, device.status_changed_at) == (False, later, at)
    assert (device.latest, device.latest_ts) == ({"t": 2, "s": "x", "n": None}, 6.5)
    assert Device.objects.get(id="b").latest == {}


def test_postgres_leaves_room_on_the_pages_ingest_updates():
    if connection.vendor != "postgresql":
        pytest.skip("fillfactor is a PostgreSQL setting (migration 0006 does nothing on SQLite)")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname, reloptions FROM pg_class WHERE relname IN ('devices_device', 'devices_telemetryrollup')"
        )
        options = dict(cursor.fetchall())
    assert options == {"devices_device": ["fillfactor=50"], "devices_telemetryrollup": ["fillfactor=50"]}


def test_the_sqlite_seq_lookup_searches_the_index_instead_of_scanning_the_table():
    if connection.vendor != "sqlite":
        pytest.skip("a SQLite query plan")
    Device.objects.create(id="a")
    with CaptureQueriesContext(connection) as captured:
        bulk.stored_seqs([("a", 1), ("a", 2)])
    (query,) = captured.captured_queries
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {query['sql']}")
        plan = " / ".join(row[-1] for row in cursor.fetchall())
    assert "SEARCH e USING COVERING INDEX event_unique_device_seq" in plan and "SCAN devices_event" not in plan, plan
