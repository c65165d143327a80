"""The history API: telemetry downsampled by the database, and a device's events."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client

from devices import rollups
from devices.models import Device, Event
from tests.gateway.api_helpers import alert, grant, telemetry, token_client

pytestmark = pytest.mark.django_db


@pytest.fixture
def api(django_user_model) -> Client:
    return token_client(django_user_model.objects.create_superuser(username="root"))


def last_id() -> int:
    return Event.objects.order_by("-id").values_list("id", flat=True).first() or 0


# --- Telemetry -----------------------------------------------------------------------------------------------------


@pytest.fixture
def history():
    """Range [1000, 2000]: ``t`` has 6 numbers inside (and 2 outside), ``s`` only strings, ``b`` only booleans."""
    points: list[tuple[float, dict[str, Any]]] = [
        (999.0, {"t": 100}),
        (1000.0, {"t": 1, "s": "a", "b": True}),
        (1100.0, {"t": 3}),
        (1250.0, {"t": 10, "rare": 0.5}),
        (1499.5, {"t": 20}),
        (1750.0, {"t": 5}),
        (2000.0, {"t": 7, "s": "b", "b": False}),
        (2001.0, {"t": -100}),
    ]
    for ts, values in points:
        telemetry("a", values, at=ts)


def test_bucketed_telemetry(api, history):
    response = api.get("/api/devices/a/telemetry?metrics=t,rare&start=1000&end=2000&buckets=4")
    assert response.status_code == 200
    assert response.json() == {
        "device": "a",
        "start": 1000.0,
        "end": 2000.0,
        "bucket": 250.0,
        "series": {
            "t": {
                "bucket": 250.0,
                "t": [1000.0, 1250.0, 1750.0],
                "min": [1.0, 10.0, 5.0],
                "max": [3.0, 20.0, 7.0],
                "mean": [2.0, 15.0, 6.0],
                "count": [2, 2, 2],
            },
            "rare": {"bucket": None, "t": [1250.0], "min": [0.5], "max": [0.5], "mean": [0.5], "count": [1]},
        },
        "last_id": last_id(),
    }


def test_raw_telemetry_when_the_range_holds_no_more_points_than_buckets(api, history):
    body = api.get("/api/devices/a/telemetry?metrics=t&start=1000&end=2000&buckets=6").json()
    assert body["bucket"] is None
    series = body["series"]["t"]
    assert series["bucket"] is None and series["t"] == [1000, 1100, 1250, 1499.5, 1750, 2000]
    assert series["min"] == series["max"] == series["mean"] == [1, 3, 10, 20, 5, 7] and series["count"] == [1] * 6


def test_empty_metric_names_are_ignored_and_repeated_ones_asked_once(api, history):
    body = api.get("/api/devices/a/telemetry?metrics=,t,,t,&start=1000&end=2000").json()
    assert list(body["series"]) == ["t"] and body["series"]["t"]["count"] == [1] * 6
    defaults = api.get("/api/devices/a/telemetry?metrics=,&start=1000&end=2000").json()
    assert list(defaults["series"]) == ["rare", "t"]  # the numeric metrics of the latest values (s and b are not)


def test_strings_and_booleans_are_not_charted(api, history):
    series = api.get("/api/devices/a/telemetry?metrics=s,b&start=0&end=3000").json()["series"]
    assert series["s"]["t"] == [] and series["b"]["t"] == []


def test_the_default_range_is_the_last_hour_and_the_default_metrics_the_numeric_latest(api):
    now = time.time()
    telemetry("a", {"t": 1, "h": 40}, at=now - 4000)
    telemetry("a", {"t": 2, "fw": "1.2", "on": True}, at=now - 60)
    before = time.time()
    body = api.get("/api/devices/a/telemetry").json()
    assert before - 1 <= body["end"] <= time.time() + 1 and body["start"] == pytest.approx(body["end"] - 3600)
    assert sorted(body["series"]) == ["h", "t"]
    assert body["series"]["t"]["mean"] == [2] and body["series"]["h"]["t"] == []
    explicit_end = api.get(f"/api/devices/a/telemetry?end={now - 3000}&metrics=t").json()
    assert explicit_end["start"] == pytest.approx(now - 6600) and explicit_end["series"]["t"]["mean"] == [1]


def test_a_year_of_hourly_points_comes_back_in_at_most_the_asked_buckets(api):
    Device.objects.create(id="y")
    start = 1_700_000_000.0
    Event.objects.bulk_create(
        [
            Event(device_id="y", kind="telemetry", ts=start + minute * 60, body={"values": {"t": minute // 60 % 24}})
            for minute in range(0, 525_600, 60)  # one point per hour keeps the test quick; the bench does minutes
        ]
    )
    rollups.rebuild(device_ids=["y"])  # history written around ingest gets its hourly rollups
    body = api.get(f"/api/devices/y/telemetry?metrics=t&start={start}&end={start + 365 * 86400}&buckets=365").json()
    series = body["series"]["t"]
    assert len(series["t"]) == 365 and sum(series["count"]) == 8760 and body["bucket"] == 86400
    assert series["count"][0] == 24 and series["min"][0] == 0 and series["max"][0] == 23


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("start=2000&end=1000", "start (2000.0) must be before end (1000.0)"),
        ("start=1000&end=1000", "must be before end"),
        ("buckets=0", "query parameter buckets:"),
        ("buckets=2001", "query parameter buckets:"),
        ("start=nan", "query parameter start:"),
        ("end=inf", "query parameter end:"),
        ("start=-1", "query parameter start:"),
        ("start=x", "(got 'x')"),
        ("metrics=" + ",".join(f"m{n}" for n in range(21)), "query parameter metrics: String should match pattern"),
        ("metrics=" + "x" * 129, "query parameter metrics:"),
        ("metrics=t&metrics=s", "query parameter metrics: given 2 times, expected once"),
    ],
)
def test_bad_telemetry_parameters_get_400(api, history, query, named):
    response = api.get(f"/api/devices/a/telemetry?{query}")
    assert response.status_code == 400 and response.json()["error"] == "bad_request"
    assert named in response.json()["message"]


# --- Events --------------------------------------------------------------------------------------------------------


@pytest.fixture
def events() -> list[int]:
    """Three events of ``a``, 300, 200 and 100 s old (info, warning, critical), telemetry between, one of ``b``."""
    ids = []
    for severity, age in [("info", 300), ("warning", 200), ("critical", 100)]:
        ids.append(alert("a", severity, age=age, name=f"e-{severity}"))
        telemetry("a", {"t": 1})
    alert("b", "critical")
    return ids


def test_a_devices_events_newest_first_as_frames(api, events):
    response = api.get("/api/devices/a/events")
    assert response.status_code == 200
    body = response.json()
    assert [e["id"] for e in body["events"]] == events[::-1] and body["last_id"] == last_id()
    stored = Event.objects.get(id=events[2])
    assert body["events"][0] == {
        "type": "event",
        "id": events[2],
        "device": "a",
        "ts": stored.ts,
        "name": "e-critical",
        "severity": "critical",
        "acknowledged": None,
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("severity=critical", [2]),
        ("severity=info,warning", [1, 0]),
        ("severity=info,warning,critical", [2, 1, 0]),
        ("limit=2", [2, 1]),
        ("limit=1&before={2}", [1]),
        ("before={1}", [0]),
        ("before={0}", []),
        ("start={now_250}", [2, 1]),
        ("end={now_150}", [1, 0]),
        ("start={now_250}&end={now_150}&severity=warning", [1]),
    ],
)
def test_event_filters_and_paging(api, events, query, expected):
    now = time.time()
    url = "/api/devices/a/events?" + query.format(*events, now_250=now - 250, now_150=now - 150)
    assert [e["id"] for e in api.get(url).json()["events"]] == [events[n] for n in expected]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("severity=fatal", "query parameter severity: String should match pattern"),
        ("severity=", "query parameter severity:"),
        ("severity=info,", "(got 'info,')"),
        ("limit=0", "query parameter limit:"),
        ("limit=1001", "query parameter limit:"),
        ("before=0", "query parameter before:"),
        (f"before={2**63}", "query parameter before:"),
        ("start=inf", "query parameter start:"),
    ],
)
def test_bad_event_parameters_get_400(api, events, query, named):
    response = api.get(f"/api/devices/a/events?{query}")
    assert response.status_code == 400 and named in response.json()["message"]


def test_viewers_may_read_history_of_their_devices_only(client, events, django_user_model):
    telemetry("b", {"t": 5}, at=1500)
    viewer = django_user_model.objects.create_user(username="viewer")
    grant(viewer, level="view", device_ids=["b"])
    client.force_login(viewer)
    assert client.get("/api/devices/b/events").status_code == 200
    assert client.get("/api/devices/b/telemetry?metrics=t&start=1000&end=2000").json()["series"]["t"]["mean"] == [5]
    for path in ("events", "telemetry"):
        assert client.get(f"/api/devices/a/{path}").status_code == 404
