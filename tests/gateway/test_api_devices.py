"""The devices API: lists with filters, sorting, paging and counts; one device; deletion; permissions and auth."""

from __future__ import annotations

import pytest
from django.test import Client

from devices.models import Acknowledgement, Command, Device, Event, Fleet
from devices.records import EventKind
from tests.gateway.api_helpers import alert, grant, store, telemetry, token_client

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser(username="root", password="pw")


@pytest.fixture
def api(root) -> Client:
    return token_client(root)


@pytest.fixture
def fleet():
    """Three devices: a heater online in fleet north, a sensor offline in north, a sensor online alone."""
    Device.objects.create(id="b-1", name="Boiler", kind="heater", online=True)
    Device.objects.create(id="a-2", name="Attic", kind="sensor", online=False)
    Device.objects.create(id="c-3", name="cellar boiler", kind="sensor", online=True)
    Fleet.objects.create(name="north").devices.add(*Device.objects.filter(id__in=["b-1", "a-2"]))


def last_id() -> int:
    return Event.objects.order_by("-id").values_list("id", flat=True).first() or 0


def ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [device["id"] for device in response.json()["devices"]]


# --- The list ------------------------------------------------------------------------------------------------------


def test_the_list_shows_every_field_of_a_device(api, fleet):
    telemetry("c-3", {"temp": 21.5, "fw": "2.1"}, at=1_767_225_600.5)
    alert("c-3", "critical")
    alert("c-3", "warning")

    body = api.get("/api/devices").json()

    last_seen = Device.objects.get(id="c-3").last_seen
    assert last_seen is not None
    assert body["devices"][2] == {
        "id": "c-3",
        "name": "cellar boiler",
        "kind": "sensor",
        "online": True,
        "last_seen": last_seen.timestamp(),
        "status_changed_at": None,
        "latest": {"temp": 21.5, "fw": "2.1"},
        "latest_ts": 1_767_225_600.5,
        "fleets": [],
        "alerting": True,
        "alerts": 2,
    }
    assert body["devices"][0]["fleets"] == ["north"] and body["devices"][0]["alerting"] is False
    assert body["total"] == 3 and body["last_id"] == last_id()
    assert body["counts"] == {"online": 2, "offline": 1, "alerting": 1}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["a-2", "b-1", "c-3"]),
        ("online=true", ["b-1", "c-3"]),
        ("online=false", ["a-2"]),
        ("kind=sensor", ["a-2", "c-3"]),
        ("kind=nothing", []),
        ("fleet=north", ["a-2", "b-1"]),
        ("fleet=south", []),
        ("q=BOILER", ["b-1", "c-3"]),
        ("q=-3", ["c-3"]),
        ("q=att", ["a-2"]),
        ("alerting=true", ["c-3"]),
        ("alerting=false", ["a-2", "b-1"]),
        ("kind=sensor&online=true&q=cell&fleet=", ["c-3"]),
        ("sort=-id", ["c-3", "b-1", "a-2"]),
        ("sort=name", ["a-2", "b-1", "c-3"]),
        ("sort=-name", ["c-3", "b-1", "a-2"]),
        ("sort=-last_seen", ["c-3", "b-1", "a-2"]),
        ("sort=last_seen", ["a-2", "b-1", "c-3"]),
    ],
)
def test_filters_and_sorting(api, fleet, query, expected):
    telemetry("b-1", {"t": 1}, at=1000)
    telemetry("c-3", {"t": 1}, at=2000)
    alert("c-3")
    response = api.get(f"/api/devices?{query}")
    assert ids(response) == expected
    body = response.json()
    assert body["total"] == len(expected)
    assert body["counts"] == {"online": 2, "offline": 1, "alerting": 1}  # whatever the filters


def test_an_empty_fleet_filter_is_no_filter(api, fleet):
    assert ids(api.get("/api/devices?fleet=")) == ["a-2", "b-1", "c-3"]


def test_paging_with_limit_and_offset(api):
    Device.objects.bulk_create([Device(id=f"d-{n:03d}") for n in range(150)])
    first = api.get("/api/devices").json()
    assert len(first["devices"]) == 100 and first["total"] == 150  # the default limit
    assert ids(api.get("/api/devices?limit=20&offset=140")) == [f"d-{n:03d}" for n in range(140, 150)]
    assert ids(api.get("/api/devices?limit=1000&offset=150")) == []
    page = api.get("/api/devices?limit=2&offset=3&sort=-id").json()
    assert [d["id"] for d in page["devices"]] == ["d-146", "d-145"] and page["total"] == 150


def test_only_acknowledged_or_old_alerts_leave_a_device_not_alerting(api, root, fleet):
    alert("a-2", "warning", age=3700)  # older than an hour
    alert("b-1", "info")
    acknowledged = alert("c-3", "critical")
    Acknowledgement.objects.create(
        event_id=acknowledged, device_id="c-3", event_ts=0, acknowledged_by=root, acknowledged_at="2026-01-01T00:00Z"
    )
    body = api.get("/api/devices").json()
    assert body["counts"]["alerting"] == 0
    assert [d["alerts"] for d in body["devices"]] == [0, 0, 0]
    assert ids(api.get("/api/devices?alerting=true")) == []


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("offset=-1", "offset"),
        ("online=maybe", "online"),
        ("sort=size", "sort"),
        ("q=" + "x" * 201, "q"),
        ("kind=a%00b", "kind"),
    ],
)
def test_bad_query_parameters_get_400_naming_the_parameter_and_value(api, query, named):
    response = api.get(f"/api/devices?{query}")
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "bad_request"
    assert f"query parameter {named}:" in body["message"]
    value = query.partition("=")[2].replace("%00", "\x00")[:20]
    assert repr(value)[1:-1][:10] in body["message"]


def test_a_viewer_sees_and_counts_only_their_devices(client, fleet, django_user_model):
    alert("c-3")
    bob = django_user_model.objects.create_user(username="bob")
    grant(bob, level="view", device_ids=["a-2", "b-1"])
    client.force_login(bob)
    body = client.get("/api/devices").json()
    assert [d["id"] for d in body["devices"]] == ["a-2", "b-1"]
    assert body["counts"] == {"online": 1, "offline": 1, "alerting": 0} and body["total"] == 2
    assert ids(client.get("/api/devices?alerting=true")) == []


def test_a_user_without_grants_sees_nothing(client, fleet, django_user_model):
    client.force_login(django_user_model.objects.create_user(username="nobody"))
    body = client.get("/api/devices").json()
    assert body["devices"] == [] and body["total"] == 0
    assert body["counts"] == {"online": 0, "offline": 0, "alerting": 0}


# --- One device ----------------------------------------------------------------------------------------------------


def test_one_device_with_its_events_and_commands(api, fleet):
    Device.objects.filter(id="c-3").update(online=True)
    telemetry("c-3", {"temp": 20})
    event = alert("c-3", "critical")
    for name in ("reboot", "blink"):
        assert (
            api.post("/api/commands", {"device": "c-3", "name": name}, content_type="application/json").status_code
            == 201
        )
    newest = Command.objects.filter(device_id="c-3").order_by("-created_at")[0]

    response = api.get("/api/devices/c-3")

    assert response.status_code == 200
    body = response.json()
    assert body["device"]["id"] == "c-3" and body["device"]["latest"] == {"temp": 20} and body["device"]["alerts"] == 1
    assert body["last_id"] == last_id()
    assert [e["type"] for e in body["events"]] == ["command", "command", "event", "telemetry"]  # newest first
    event_frame = body["events"][2]
    assert event_frame["id"] == event and event_frame["severity"] == "critical" and event_frame["acknowledged"] is None
    assert [c["name"] for c in body["commands"]] == ["blink", "reboot"]
    assert body["commands"][0] == {
        "type": "command",
        "id": body["events"][0]["id"],
        "device": "c-3",
        "ts": body["events"][0]["ts"],
        "command_id": newest.id,
        "name": "blink",
        "state": "pending",
    }


def test_one_device_keeps_only_the_newest_50_events(api):
    for n in range(55):
        telemetry("a", {"n": n})
    events = api.get("/api/devices/a").json()["events"]
    assert len(events) == 50 and events[0]["values"] == {"n": 54}


@pytest.mark.parametrize("device_id", ["nope", "hidden", "bad%00id", "x" * 65, "-dash"])
def test_an_unknown_invisible_or_invalid_device_gets_the_same_404(client, django_user_model, device_id):
    Device.objects.create(id="hidden")
    Device.objects.create(id="mine")
    bob = django_user_model.objects.create_user(username="bob")
    grant(bob, level="operate", device_ids=["mine"])
    client.force_login(bob)
    assert client.get("/api/devices/mine").status_code == 200
    for path in ("", "/telemetry", "/events", "/commands"):
        response = client.get(f"/api/devices/{device_id}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"] == "unknown_device"


# --- Deletion ------------------------------------------------------------------------------------------------------


def test_deleting_a_device_takes_its_history_with_it(api, root, fleet):
    Device.objects.filter(id="c-3").update(online=True)
    telemetry("c-3", {"t": 1})
    event = alert("c-3")
    store("b-1", EventKind.TELEMETRY, {"values": {"t": 2}})
    api.post("/api/commands", {"device": "c-3", "name": "reboot"}, content_type="application/json")
    api.post("/api/devices/c-3/alerts/ack", {"event_ids": [event]}, content_type="application/json")
    assert Acknowledgement.objects.count() == 1

    response = api.delete("/api/devices/c-3")

    assert response.status_code == 204 and response.content == b""
    assert not Device.objects.filter(id="c-3").exists()
    assert not Event.objects.filter(device_id="c-3").exists() and Event.objects.filter(device_id="b-1").exists()
    assert not Command.objects.exists() and not Acknowledgement.objects.exists()
    assert api.get("/api/devices/c-3").status_code == 404
    assert api.delete("/api/devices/c-3").status_code == 404


def test_deleting_needs_operate(client, fleet, django_user_model):
    bob = django_user_model.objects.create_user(username="bob")
    grant(bob, level="view", device_ids=["a-2"])
    grant(bob, level="operate", device_ids=["b-1"])
    client.force_login(bob)

    refused = client.delete("/api/devices/a-2")
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    hidden = client.delete("/api/devices/c-3")
    assert hidden.status_code == 404 and hidden.json()["error"] == "unknown_device"
    assert client.delete("/api/devices/b-1").status_code == 204
    assert sorted(Device.objects.values_list("id", flat=True)) == ["a-2", "c-3"]


# --- Authentication (every operation) ------------------------------------------------------------------------------

OPERATIONS = [
    ("get", "/api/devices"),
    ("get", "/api/devices/a-2"),
    ("delete", "/api/devices/a-2"),
    ("get", "/api/devices/a-2/telemetry"),
    ("get", "/api/devices/a-2/events"),
    ("post", "/api/devices/a-2/alerts/ack"),
    ("post", "/api/alerts/ack"),
    ("post", "/api/commands"),
    ("get", "/api/commands/abc"),
    ("get", "/api/devices/a-2/commands"),
]
UNSAFE = [(method, path) for method, path in OPERATIONS if method in ("post", "delete")]


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_operation_needs_credentials(client, fleet, method, path):
    response = getattr(client, method)(path, content_type="application/json")
    assert response.status_code == 401
    assert response.json() == {"error": "unauthenticated", "message": "log in or send Authorization: Bearer <token>"}
    assert Device.objects.count() == 3


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_a_bad_token_is_refused_everywhere_even_beside_a_session(client, root, fleet, method, path):
    client.force_login(root)
    response = getattr(client, method)(path, content_type="application/json", HTTP_AUTHORIZATION="Bearer gw_nope")
    assert response.status_code == 401 and response.json()["message"] == "invalid or revoked API token"


@pytest.mark.parametrize(("method", "path"), UNSAFE)
def test_a_session_needs_csrf_on_unsafe_methods(root, fleet, method, path):
    client = Client(enforce_csrf_checks=True)
    client.force_login(root)
    response = getattr(client, method)(path, {"devices": ["a-2"]}, content_type="application/json")
    assert response.status_code == 403 and response.json()["error"] == "csrf_failed"
    assert Device.objects.count() == 3


def test_a_session_with_the_csrf_token_may_delete(root, fleet):
    client = Client(enforce_csrf_checks=True)
    client.force_login(root)
    assert client.get("/api/devices").status_code == 200  # safe methods need no CSRF token
    client.get("/login/")
    response = client.delete("/api/devices/a-2", HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)
    assert response.status_code == 204


def test_a_token_needs_no_csrf_token(root, fleet):
    client = token_client(root)
    client.handler.enforce_csrf_checks = True
    assert client.delete("/api/devices/a-2").status_code == 204


def test_a_wrong_method_gets_a_json_405_with_allow(api, fleet):
    response = api.put("/api/devices/a-2")
    assert response.status_code == 405 and response["Allow"] == "DELETE, GET"
    assert response.json() == {"error": "method_not_allowed", "message": "use DELETE or GET"}
    assert api.post("/api/devices").status_code == 405


def test_api_answers_are_not_cached(api, fleet):
    assert "no-cache" in api.get("/api/devices")["Cache-Control"]


def test_deleting_a_device_does_not_load_its_history(api, django_assert_max_num_queries):
    Device.objects.create(id="big")
    Event.objects.bulk_create([Event(device_id="big", kind="telemetry", ts=n, body={"values": {}}) for n in range(500)])
    with django_assert_max_num_queries(15) as captured:
        assert api.delete("/api/devices/big").status_code == 204
    assert not Event.objects.exists()
    reads = [
        q["sql"] for q in captured.captured_queries if q["sql"].startswith("SELECT") and "devices_event" in q["sql"]
    ]
    assert reads == []  # one DELETE ... WHERE device_id, not a SELECT of every event first
