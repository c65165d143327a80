"""Acknowledging alerts: counts drop, only recent warnings and criticals count, who and when are stored."""

from __future__ import annotations

import time

import pytest
from django.test import Client

from devices.models import Acknowledgement, Device
from tests.gateway.api_helpers import alert, grant, token_client

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser(username="root")


@pytest.fixture
def api(root) -> Client:
    return token_client(root)


def ack(client: Client, device: str, body: dict | None = None):
    return client.post(f"/api/devices/{device}/alerts/ack", body or {}, content_type="application/json")


def counts(client: Client) -> dict:
    return client.get("/api/devices").json()["counts"]


def test_acknowledging_a_devices_alerts_drops_it_from_the_alerting_count(api, root):
    warning, critical = alert("a", "warning"), alert("a", "critical")
    alert("a", "info")
    old = alert("a", "critical", age=3700)
    alert("b", "warning")
    assert counts(api)["alerting"] == 2

    response = ack(api, "a")

    assert response.status_code == 200
    body = response.json()
    assert body["acknowledged"] == 2
    assert body["device"]["id"] == "a" and body["device"]["alerts"] == 0 and body["device"]["alerting"] is False
    assert counts(api)["alerting"] == 1
    rows = Acknowledgement.objects.order_by("event_id")
    assert [r.event_id for r in rows] == [warning, critical] and old not in [r.event_id for r in rows]
    assert {r.acknowledged_by for r in rows} == {root} and {r.device_id for r in rows} == {"a"}
    assert all(abs(r.acknowledged_at.timestamp() - time.time()) < 60 for r in rows)
    assert ack(api, "a").json()["acknowledged"] == 0  # nothing left; acknowledging again changes nothing


def test_an_acknowledgement_shows_on_the_events(api):
    event = alert("a", "critical")
    ack(api, "a")
    [frame] = api.get("/api/devices/a/events").json()["events"]
    stored = Acknowledgement.objects.get()
    assert frame["id"] == event and frame["acknowledged"] == {"by": "root", "at": stored.acknowledged_at.timestamp()}
    assert api.get("/api/devices/a").json()["events"][0]["acknowledged"]["by"] == "root"


def test_only_the_given_event_ids(api):
    first, second = alert("a", "warning"), alert("a", "critical")
    info, old, other = alert("a", "info"), alert("a", "warning", age=7200), alert("b", "warning")

    body = ack(api, "a", {"event_ids": [first, info, old, other, 10**12]}).json()

    # The info event, another device's event and an unknown id are skipped; an old warning may be acknowledged.
    assert body["acknowledged"] == 2 and body["device"]["alerts"] == 1
    assert sorted(Acknowledgement.objects.values_list("event_id", flat=True)) == sorted([first, old])
    assert ack(api, "a", {"event_ids": [first, second]}).json()["acknowledged"] == 1


def test_a_new_alert_after_an_acknowledgement_counts_again(api):
    alert("a")
    ack(api, "a")
    alert("a", "critical")
    assert counts(api)["alerting"] == 1


def test_acknowledging_needs_operate(client, django_user_model):
    alert("seen")
    alert("mine")
    alert("hidden")
    bob = django_user_model.objects.create_user(username="bob")
    grant(bob, level="view", device_ids=["seen"])
    grant(bob, level="operate", device_ids=["mine"])
    client.force_login(bob)

    refused = ack(client, "seen")
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    for device in ("hidden", "nope", "bad%00id"):
        response = ack(client, device)
        assert response.status_code == 404 and response.json()["error"] == "unknown_device"
    assert ack(client, "mine").json()["acknowledged"] == 1
    assert list(Acknowledgement.objects.values_list("device_id", flat=True)) == ["mine"]


def test_the_other_operators_see_the_change(api, django_user_model):
    alert("a")
    other = django_user_model.objects.create_user(username="other")
    grant(other, level="view", device_ids=["a"])
    viewer = token_client(other)
    assert counts(viewer)["alerting"] == 1
    ack(api, "a")
    assert counts(viewer)["alerting"] == 0


def test_acknowledging_several_devices_at_once(api):
    for device in ("a", "b", "c"):
        alert(device)
    alert("a", "critical")

    response = api.post("/api/alerts/ack", {"devices": ["a", "b"]}, content_type="application/json")

    assert response.status_code == 200
    body = response.json()
    assert body["acknowledged"] == 3 and [d["id"] for d in body["devices"]] == ["a", "b"]
    assert counts(api)["alerting"] == 1


def test_acknowledging_many_devices_takes_a_bounded_number_of_queries(api, django_assert_max_num_queries):
    devices = [f"d-{n}" for n in range(40)]
    for device in devices:
        alert(device)
    with django_assert_max_num_queries(15):
        response = api.post("/api/alerts/ack", {"devices": devices}, content_type="application/json")
    assert response.json()["acknowledged"] == 40 and len(response.json()["devices"]) == 40


def test_several_devices_are_all_or_nothing(client, django_user_model):
    for device in ("mine", "seen"):
        alert(device)
    bob = django_user_model.objects.create_user(username="bob")
    grant(bob, level="view", device_ids=["seen"])
    grant(bob, level="operate", device_ids=["mine"])
    client.force_login(bob)

    response = client.post("/api/alerts/ack", {"devices": ["mine", "seen"]}, content_type="application/json")

    assert response.status_code == 403 and "'seen'" in response.json()["message"]
    assert not Acknowledgement.objects.exists()


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/api/devices/a/alerts/ack", {"event_ids": [0]}, "body event_ids.0:"),
        ("/api/devices/a/alerts/ack", {"event_ids": "x"}, "body event_ids:"),
        ("/api/devices/a/alerts/ack", {"event_ids": list(range(1, 1002))}, "body event_ids:"),
        ("/api/alerts/ack", {"devices": []}, "body devices:"),
        ("/api/alerts/ack", {}, "body devices: Field required"),
    ],
)
def test_bad_acknowledgement_bodies_get_400(api, path, body, named):
    Device.objects.create(id="a")
    response = api.post(path, body, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"] == "bad_request"
    assert named in response.json()["message"]


@pytest.mark.parametrize("raw", [b"", b"null", b"{}", b'{"event_ids": null}'])
def test_an_empty_body_acknowledges_every_current_alert(api, raw):
    alert("a")
    response = api.post("/api/devices/a/alerts/ack", raw, content_type="application/json")
    assert response.status_code == 200 and response.json()["acknowledged"] == 1


@pytest.mark.parametrize(("raw", "named"), [(b"-77", "int"), (b"[]", "list"), (b'"x"', "str")])
def test_a_body_that_is_not_an_object_gets_400(api, raw, named):
    alert("a")
    response = api.post("/api/devices/a/alerts/ack", raw, content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"error": "bad_request", "message": f"body must be a JSON object, got {named}"}
    assert not Acknowledgement.objects.exists()
