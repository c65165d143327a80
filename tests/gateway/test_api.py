"""The HTTP API for commands: auth (token or session with CSRF), the contract's states, and reads."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from devices import services
from devices.models import Command, Device, Event
from gateway.events import COMMANDS_GROUP, EVENTS_GROUP
from tests.gateway.api_helpers import grant

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def reject_offline(settings):
    settings.GATEWAY = {**settings.GATEWAY, "COMMANDS_OFFLINE": "reject", "COMMAND_TIMEOUT": 30.0}


@pytest.fixture
def devices():
    Device.objects.create(id="on-1", online=True)
    Device.objects.create(id="off-1", online=False)
    Device.objects.create(id="hidden", online=True)


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser(username="root", password="pw")


@pytest.fixture
def token(root) -> str:
    return services.issue_token(user=root, name="tests")


@pytest.fixture
def api(client, token):
    """A client that sends the root user's token on every request."""
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


def post(client: Client, body: object, **extra):
    return client.post("/api/commands", body, content_type="application/json", **extra)


def command_events(command_id: str) -> list[Event]:
    return list(Event.objects.filter(kind="command", body__command_id=command_id).order_by("id"))


# --- Authentication --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [("post", "/api/commands"), ("get", "/api/commands/abc"), ("get", "/api/devices/on-1/commands")],
)
def test_no_credentials_get_401(client, devices, method, url):
    response = getattr(client, method)(url)
    assert response.status_code == 401 and response.json()["error"] == "unauthenticated"


@pytest.mark.parametrize("header", ["Bearer nope", "Bearer ", "bearer gw_not-a-token"])
def test_a_bad_token_gets_401(client, devices, token, header):
    response = post(client, {"device": "on-1", "name": "reboot"}, HTTP_AUTHORIZATION=header)
    assert response.status_code == 401 and response.json()["error"] == "unauthenticated"
    assert not Command.objects.exists()


def test_a_revoked_token_gets_401(client, devices, root, token):
    services.revoke_token(token_id=root.api_tokens.get().id)
    response = client.get("/api/devices/on-1/commands", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 401


def test_a_bad_token_is_refused_even_beside_a_valid_session(client, devices, root):
    client.force_login(root)
    response = client.get("/api/devices/on-1/commands", HTTP_AUTHORIZATION="Bearer nope")
    assert response.status_code == 401


def test_a_token_needs_no_csrf_token(devices, token):
    client = Client(enforce_csrf_checks=True)
    response = post(client, {"device": "on-1", "name": "reboot"}, HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 201


def test_a_session_works_and_its_posts_must_pass_csrf(devices, root):
    client = Client(enforce_csrf_checks=True)
    client.force_login(root)
    assert client.get("/api/devices/on-1/commands").status_code == 200

    refused = post(client, {"device": "on-1", "name": "reboot"})
    assert refused.status_code == 403 and refused.json()["error"] == "csrf_failed"
    assert not Command.objects.exists()

    client.get("/login/")  # sets the csrftoken cookie, as the console page does
    csrf = client.cookies["csrftoken"].value
    accepted = post(client, {"device": "on-1", "name": "reboot"}, HTTP_X_CSRFTOKEN=csrf)
    assert accepted.status_code == 201
    assert accepted.json()["command"]["requested_by"] == "root"


def test_wrong_method_gets_405(api, devices):
    assert api.get("/api/commands").status_code == 405
    response = api.post("/api/devices/on-1/commands")
    assert response.status_code == 405 and response["Allow"] == "GET"


# --- Sending ---------------------------------------------------------------------------------------------------


def test_a_command_to_an_online_device_is_stored_pending_with_an_event(api, devices, layer):
    wake, events = async_to_sync(layer.new_channel)(), async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(COMMANDS_GROUP, wake)
    async_to_sync(layer.group_add)(EVENTS_GROUP, events)

    response = post(api, {"device": "on-1", "name": "reboot", "params": {"delay": 5}, "timeout": 12})

    assert response.status_code == 201
    body = response.json()
    command = body["command"]
    assert command["state"] == "pending" and command["device"] == "on-1" and command["name"] == "reboot"
    assert command["params"] == {"delay": 5} and command["requested_by"] == "root"
    assert command["request_id"] is None and command["error"] is None and command["result"] is None
    assert command["sent_at"] is None and command["finished_at"] is None and command["late_reply"] is None
    stored = Command.objects.get(id=command["id"])
    assert (stored.expires_at - stored.created_at).total_seconds() == pytest.approx(12)
    assert command["created_at"] == stored.created_at.isoformat()

    [event] = command_events(command["id"])
    assert body["last_event"] == {
        "type": "command",
        "id": event.id,
        "device": "on-1",
        "ts": event.ts,
        "command_id": command["id"],
        "name": "reboot",
        "state": "pending",
    }
    # Announced to browsers, and the bridges were woken.
    assert async_to_sync(layer.receive)(wake)["type"] == "gateway.commands.wake"
    announced = async_to_sync(layer.receive)(events)
    assert [e["id"] for e in announced["events"]] == [event.id]


def test_an_offline_device_with_the_reject_policy_gets_a_rejected_command(api, devices, layer):
    wake = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(COMMANDS_GROUP, wake)

    response = post(api, {"device": "off-1", "name": "reboot"})

    assert response.status_code == 201
    body = response.json()
    assert body["command"]["state"] == "rejected" and body["command"]["error"] == "device_offline"
    assert body["command"]["finished_at"] is not None
    assert body["last_event"]["state"] == "rejected" and body["last_event"]["error"] == "device_offline"
    assert len(command_events(body["command"]["id"])) == 1
    # Nothing to publish: the bridges are not woken.
    assert layer.channels.get(wake) is None or layer.channels[wake].empty()


def test_an_offline_device_with_the_hold_policy_gets_a_pending_command(api, devices, settings):
    settings.GATEWAY = {**settings.GATEWAY, "COMMANDS_OFFLINE": "hold"}
    response = post(api, {"device": "off-1", "name": "reboot"})
    assert response.status_code == 201 and response.json()["command"]["state"] == "pending"


def test_a_repeated_request_id_returns_the_existing_command_and_stores_nothing(api, devices):
    first = post(api, {"device": "on-1", "name": "reboot", "request_id": "r-1"})
    assert first.status_code == 201
    events_before = Event.objects.count()

    again = post(api, {"device": "on-1", "name": "reboot", "request_id": "r-1"})

    assert again.status_code == 200
    assert again.json()["command"]["id"] == first.json()["command"]["id"]
    assert again.json()["command"]["request_id"] == "r-1"
    assert again.json()["last_event"] == first.json()["last_event"]
    assert first.json()["last_event"]["request_id"] == "r-1"
    assert Event.objects.count() == events_before and Command.objects.count() == 1


@pytest.mark.parametrize("name", ["a/b", "+", "#", "$x", "a\x00b", "", "x" * 65, "with space"])
def test_a_bad_command_name_gets_400(api, devices, name):
    response = post(api, {"device": "on-1", "name": name})
    assert response.status_code == 400 and response.json()["error"] == "bad_command"
    assert not Command.objects.exists()


@pytest.mark.parametrize("params", [[1, 2], "x", 3, None, True])
def test_params_that_are_not_an_object_get_400(api, devices, params):
    response = post(api, {"device": "on-1", "name": "reboot", "params": params})
    assert response.status_code == 400 and response.json()["error"] == "bad_command"


@pytest.mark.parametrize("timeout", [0, 3601, "10", True])
def test_a_bad_timeout_gets_400(api, devices, timeout):
    response = post(api, {"device": "on-1", "name": "reboot", "timeout": timeout})
    assert response.status_code == 400 and response.json()["error"] == "bad_command"


def test_params_larger_than_the_payload_limit_get_400(api, devices, settings):
    settings.GATEWAY = {**settings.GATEWAY, "MAX_PAYLOAD": 64}
    response = post(api, {"device": "on-1", "name": "reboot", "params": {"blob": "x" * 100}})
    assert response.status_code == 400 and response.json()["error"] == "too_large"


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b'"x"',
        b'{"device": "on-1", "name": "r", "params": {"x": NaN}}',
        b"\xff\xfe",
        b"null",
        b"",
    ],
)
def test_a_body_that_is_not_a_json_object_gets_400(api, devices, raw):
    response = api.post("/api/commands", raw, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"] == "bad_request"


@pytest.mark.parametrize("body", [{"name": "reboot"}, {"device": "on-1"}, {"device": 5, "name": "reboot"}])
def test_missing_or_non_string_device_or_name_gets_400(api, devices, body):
    response = post(api, body)
    assert response.status_code == 400 and response.json()["error"] == "bad_request"


def test_an_unknown_device_gets_404(api, devices):
    for device in ("nope", "bad/id"):
        response = post(api, {"device": device, "name": "reboot"})
        assert response.status_code == 404 and response.json()["error"] == "unknown_device"


def test_a_device_the_user_may_not_see_gets_the_same_404_as_an_unknown_one(client, devices, django_user_model):
    bob = django_user_model.objects.create_user(username="bob")
    grant(bob, level="operate", device_ids=["on-1"])
    client.force_login(bob)
    hidden = post(client, {"device": "hidden", "name": "reboot"})
    unknown = post(client, {"device": "nope", "name": "reboot"})
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"] == unknown.json()["error"] == "unknown_device"
    assert post(client, {"device": "on-1", "name": "reboot"}).json()["command"]["state"] == "pending"


def test_a_viewer_without_operate_gets_a_rejected_command_for_the_audit_trail(client, devices, django_user_model):
    viewer = django_user_model.objects.create_user(username="viewer")
    grant(viewer, level="view", device_ids=["on-1"])
    client.force_login(viewer)

    response = post(client, {"device": "on-1", "name": "reboot"})

    assert response.status_code == 201
    command = response.json()["command"]
    assert command["state"] == "rejected" and command["error"] == "forbidden" and command["requested_by"] == "viewer"
    stored = Command.objects.get(id=command["id"])
    assert stored.state == "rejected" and stored.requested_by == viewer
    assert [e.body["state"] for e in command_events(command["id"])] == ["rejected"]


# --- Reading ---------------------------------------------------------------------------------------------------


def test_get_a_command(api, devices):
    created = post(api, {"device": "on-1", "name": "reboot", "params": {"a": 1}}).json()
    last_id = Event.objects.order_by("-id").values_list("id", flat=True)[0]

    response = api.get(f"/api/commands/{created['command']['id']}")

    assert response.status_code == 200
    body = response.json()
    assert body["command"] == created["command"]
    assert body["last_event"] == created["last_event"]
    assert body["last_id"] == last_id


def test_get_a_command_shows_its_final_state(api, devices):
    created = post(api, {"device": "on-1", "name": "reboot"}).json()["command"]
    Command.objects.filter(id=created["id"]).update(state="succeeded", result={"echo": {}})
    body = api.get(f"/api/commands/{created['id']}").json()
    assert body["command"]["state"] == "succeeded" and body["command"]["result"] == {"echo": {}}


def test_an_unknown_or_invisible_command_gets_404(api, client, devices, django_user_model):
    assert api.get("/api/commands/0123456789abcdef").status_code == 404
    created = post(api, {"device": "hidden", "name": "reboot"}).json()["command"]
    bob = django_user_model.objects.create_user(username="bob")
    grant(bob, level="view", device_ids=["on-1"])
    other = Client()
    other.force_login(bob)
    response = other.get(f"/api/commands/{created['id']}")
    assert response.status_code == 404 and response.json()["error"] == "unknown_command"


def test_list_a_devices_commands_newest_first(api, devices):
    ids = [post(api, {"device": "on-1", "name": f"c{n}"}).json()["command"]["id"] for n in range(3)]
    post(api, {"device": "off-1", "name": "other"})

    body = api.get("/api/devices/on-1/commands").json()
    assert [c["id"] for c in body["commands"]] == ids[::-1]
    assert body["last_id"] == Event.objects.order_by("-id").values_list("id", flat=True)[0]

    limited = api.get("/api/devices/on-1/commands?limit=2").json()
    assert [c["id"] for c in limited["commands"]] == ids[:0:-1]


@pytest.mark.parametrize("limit", ["0", "-1", "x", "201"])
def test_a_bad_limit_gets_400(api, devices, limit):
    response = api.get(f"/api/devices/on-1/commands?limit={limit}")
    assert response.status_code == 400 and response.json()["error"] == "bad_request"


def test_commands_of_an_unknown_or_invisible_device_get_404(client, devices, django_user_model):
    bob = django_user_model.objects.create_user(username="bob")
    grant(bob, level="view", device_ids=["on-1"])
    client.force_login(bob)
    assert client.get("/api/devices/on-1/commands").status_code == 200
    for device in ("hidden", "nope"):
        response = client.get(f"/api/devices/{device}/commands")
        assert response.status_code == 404 and response.json()["error"] == "unknown_device"


def test_a_database_outage_gets_503_unavailable_and_stores_nothing(api, devices, monkeypatch):
    from django.db import OperationalError

    from gateway.api import commands

    def database_down(**kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(commands, "request_command", database_down)
    response = post(api, {"device": "on-1", "name": "reboot", "request_id": "r-db"})
    assert response.status_code == 503
    assert response.json()["error"] == "unavailable"
    assert not Command.objects.exists()
