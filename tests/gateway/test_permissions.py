"""The permission matrix (contract section 6) on every surface: WebSocket, HTTP API and console.

The world: two fleets, north (n1, n2) and south (s1); group A may view north and operate south, group B may operate
north. alice is in A, bob in B, root is a superuser, nobody has no group. ``MATRIX`` below is the spec: what each
user may do with each device. Every test reads its expectation from it; nothing else decides what is allowed.

Invisible and unknown must look the same: wherever a device is refused because the user may not see it, the answer is
compared with the one for ``ghost``, a device that does not exist.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client

from devices import services
from devices.models import Command, Device, Event, Fleet, FleetAccess
from devices.permissions import access_for
from devices.records import EventKind, EventRecord, Observation
from gateway.hub import Hub
from tests.gateway.test_consumers import announce, connect

# reset_sequences: event ids start at 1, so a replay after 0 has no gap in front (ids below the first one would
# look purged).
pytestmark = [pytest.mark.django_db(transaction=True, reset_sequences=True)]

NONE, VIEW, OPERATE = "none", "view", "operate"
DEVICES = ("n1", "n2", "s1")
GHOST = "ghost"  # a well-formed id that no device has

# The spec. Rows: users; columns: DEVICES.
# fmt: off
MATRIX: dict[str, tuple[str, str, str]] = {
    #          n1       n2       s1
    "alice":  (VIEW,    VIEW,    OPERATE),  # group A: view north, operate south
    "bob":    (OPERATE, OPERATE, NONE),     # group B: operate north
    "root":   (OPERATE, OPERATE, OPERATE),  # superuser
    "nobody": (NONE,    NONE,    NONE),     # no group
}
# fmt: on
USERS = tuple(MATRIX)
CELLS = [
    pytest.param(user, device, level, id=f"{user}-{device}-{level}")
    for user, levels in MATRIX.items()
    for device, level in zip(DEVICES, levels, strict=True)
]


def visible(user: str) -> list[str]:
    return [device for device, level in zip(DEVICES, MATRIX[user], strict=True) if level != NONE]


# What each level gets on each surface.
@dataclass(frozen=True)
class Outcome:
    ws_subscribe: str  # "subscribed" or the error code
    command_state: str | None  # the stored state, or None when nothing is stored
    command_error: str  # the command's stored error, or the refusal code when nothing is stored
    http_command_status: int
    http_read_status: int  # GET /api/devices/<id>/commands, GET /api/commands/<id>, /devices/<id>/


# fmt: off
OUTCOMES = {
    #                 WS subscribe      stored command state     command error     POST  reads
    OPERATE: Outcome("subscribed",     Command.State.PENDING,   "",               201,  200),
    VIEW:    Outcome("subscribed",     Command.State.REJECTED,  "forbidden",      201,  200),
    NONE:    Outcome("unknown_device", None,                    "unknown_device", 404,  404),
}
# fmt: on


# --- The world --------------------------------------------------------------------------------------------------


@dataclass
class World:
    users: dict[str, Any]
    tokens: dict[str, str]
    commands: dict[str, str]  # device -> id of a command root sent to it

    def events_of(self, devices: list[str]) -> list[int]:
        return list(Event.objects.filter(device_id__in=devices).order_by("id").values_list("id", flat=True))


def reboots_by(user: Any) -> list[Command]:
    return list(Command.objects.filter(requested_by=user, name="reboot"))


def _observe(device: str, kind: EventKind, body: dict[str, Any]) -> Observation:
    return Observation(device_id=device, kind=kind, received_at=time.time(), body=body)


def ingest(*observations: Observation) -> list[EventRecord]:
    return services.ingest(observations=list(observations), auto_register=True, max_devices=100).stored


def telemetry(*devices: str, value: float = 1.0) -> list[EventRecord]:
    return ingest(*(_observe(d, EventKind.TELEMETRY, {"values": {"v": value}}) for d in devices))


@pytest.fixture
def world(transactional_db, settings) -> World:
    settings.GATEWAY = {**settings.GATEWAY, "COMMANDS_OFFLINE": "reject", "COMMAND_TIMEOUT": 30.0}
    # Every device online (a command to an offline one is rejected for that reason, which is not under test),
    # with telemetry and an event, so replays have something of each device to leak.
    ingest(*(_observe(d, EventKind.STATUS, {"online": True}) for d in DEVICES))
    telemetry(*DEVICES)
    ingest(*(_observe(d, EventKind.EVENT, {"name": "door", "severity": "warning", "message": d}) for d in DEVICES))

    north, south = Fleet.objects.create(name="north"), Fleet.objects.create(name="south")
    north.devices.add(*Device.objects.filter(id__in=["n1", "n2"]))
    south.devices.add(Device.objects.get(id="s1"))
    group_a, group_b = Group.objects.create(name="A"), Group.objects.create(name="B")
    FleetAccess.objects.create(fleet=north, group=group_a, level=FleetAccess.Level.VIEW)
    FleetAccess.objects.create(fleet=south, group=group_a, level=FleetAccess.Level.OPERATE)
    FleetAccess.objects.create(fleet=north, group=group_b, level=FleetAccess.Level.OPERATE)

    model = get_user_model()
    users = {
        "alice": model.objects.create_user(username="alice", password="pw"),
        "bob": model.objects.create_user(username="bob", password="pw"),
        "root": model.objects.create_superuser(username="root", password="pw"),
        "nobody": model.objects.create_user(username="nobody", password="pw"),
    }
    users["alice"].groups.add(group_a)
    users["bob"].groups.add(group_b)
    tokens = {name: services.issue_token(user=user) for name, user in users.items()}

    # A command on every device (its state events are history too).
    commands = {}
    for device in DEVICES:
        outcome = services.request_command(
            user=users["root"],
            access=access_for(users["root"]),
            device_id=device,
            name="setup",
            params={},
            request_id=None,
            timeout=30.0,
            offline_policy="reject",
            max_payload=65536,
        )
        commands[device] = outcome.command.id
    return World(users=users, tokens=tokens, commands=commands)


def test_the_matrix_is_what_the_grants_say(world):
    """The table above is derived by hand from the grants; the permission module must agree with it."""
    for user, levels in MATRIX.items():
        access = access_for(world.users[user])
        for device, level in zip(DEVICES, levels, strict=True):
            actual = OPERATE if access.can_operate(device) else VIEW if access.can_view(device) else NONE
            assert actual == level, (user, device)


# --- WebSocket ---------------------------------------------------------------------------------------------------


def without(text: str, device: str) -> str:
    return text.replace(repr(device), "<id>").replace(device, "<id>")


async def open_socket(world: World, user: str):
    communicator = await connect(world.tokens[user])
    hello = await communicator.receive_json_from()
    assert hello["type"] == "hello" and hello["user"] == user
    return communicator


async def receive(communicator, timeout: float = 3.0) -> dict[str, Any]:
    return json.loads(await communicator.receive_from(timeout=timeout))


@pytest.mark.parametrize(("user", "device", "level"), CELLS)
async def test_websocket_subscribe(layer, world, user, device, level):
    expected = OUTCOMES[level]
    communicator = await open_socket(world, user)
    await communicator.send_json_to({"op": "subscribe", "devices": [device], "request_id": "s"})
    first = await receive(communicator)
    if expected.ws_subscribe == "subscribed":
        assert first == {"type": "subscribed", "devices": [device]}
    else:
        assert first["type"] == "error" and first["code"] == expected.ws_subscribe and first["ref"] == "s", first
        assert await receive(communicator) == {"type": "subscribed", "devices": []}
        # The same answer, word for word, as for a device that does not exist.
        await communicator.send_json_to({"op": "subscribe", "devices": [GHOST], "request_id": "s"})
        ghost = await receive(communicator)
        assert {**first, "message": without(first["message"], device)} == {
            **ghost,
            "message": without(ghost["message"], GHOST),
        }
        assert await receive(communicator) == {"type": "subscribed", "devices": []}
    assert await communicator.receive_nothing(timeout=0.1)
    await communicator.disconnect()


@pytest.mark.parametrize(("user", "device", "level"), CELLS)
async def test_websocket_command(layer, world, user, device, level):
    expected = OUTCOMES[level]
    communicator = await open_socket(world, user)
    frame = {"op": "command", "device": device, "name": "reboot", "params": {"n": 1}, "request_id": f"ws-{user}"}
    await communicator.send_json_to(frame)
    reply = await receive(communicator)
    stored = await sync_to_async(reboots_by)(world.users[user])
    if expected.command_state is None:
        assert reply["type"] == "error" and reply["code"] == expected.command_error, reply
        assert reply["ref"] == f"ws-{user}"
        assert stored == []
        await communicator.send_json_to({**frame, "device": GHOST})
        ghost = await receive(communicator)
        assert without(reply["message"], device) == without(ghost["message"], GHOST)
    else:
        assert reply["type"] == "command" and reply["device"] == device, reply
        assert reply["state"] == expected.command_state and reply["request_id"] == f"ws-{user}", reply
        assert reply.get("error", "") == expected.command_error
        assert [(c.device_id, c.state, c.error) for c in stored] == [
            (device, expected.command_state, expected.command_error)
        ]
    await communicator.disconnect()


async def collect(communicator, expected_ids: list[int], *, quiet: float = 0.3) -> tuple[list[dict], list[str]]:
    """Every event frame until ``expected_ids`` have all arrived, then ``quiet`` seconds of nothing more.

    Returns the events (batch frames flattened) and the type of every frame received."""
    events: list[dict[str, Any]] = []
    frame_types: list[str] = []
    wanted = set(expected_ids)
    while not wanted <= {e.get("id") for e in events}:
        frame = await receive(communicator)
        frame_types.append(frame["type"])
        events.extend(frame["events"] if frame["type"] == "batch" else [frame])
    while not await communicator.receive_nothing(timeout=quiet):
        frame = await receive(communicator)
        frame_types.append(frame["type"])
        events.extend(frame["events"] if frame["type"] == "batch" else [frame])
    return events, frame_types


@pytest.mark.parametrize("user", USERS)
async def test_websocket_wildcard_replays_and_delivers_only_visible_devices(layer, world, user):
    mine = visible(user)
    history = await sync_to_async(world.events_of)(mine)
    communicator = await open_socket(world, user)
    await communicator.send_json_to({"op": "subscribe", "devices": "*", "after": 0})
    assert await receive(communicator) == {"type": "subscribed", "devices": "*"}

    replayed, _ = await collect(communicator, history)
    assert [e.get("id") for e in replayed] == history  # no gap frame, nothing of an invisible device
    assert {e["device"] for e in replayed} == set(mine)

    # Live: events of all three devices, in one layer message (so they share batch frames) and one by one.
    await Hub.for_layer(layer).ready.wait()
    together = await sync_to_async(telemetry)(*DEVICES, value=2.0)
    await announce(layer, together)
    apart = [await sync_to_async(telemetry)(device, value=3.0) for device in reversed(DEVICES)]
    for records in apart:
        await announce(layer, records)
    published = together + [record for records in apart for record in records]
    expected = [record.id for record in published if record.device_id in mine]
    live, frame_types = await collect(communicator, expected)
    assert [e["id"] for e in live] == expected
    assert {e["device"] for e in live} <= set(mine)
    if sum(1 for device in DEVICES if device in mine) > 1:
        assert "batch" in frame_types, "the shared layer message should reach this socket as a batch frame"
    await communicator.disconnect()


@pytest.mark.parametrize("user", USERS)
async def test_websocket_explicit_subscribe_with_after_replays_only_visible_devices(layer, world, user):
    mine = visible(user)
    history = await sync_to_async(world.events_of)(mine)
    communicator = await open_socket(world, user)
    await communicator.send_json_to({"op": "subscribe", "devices": [*DEVICES, GHOST], "after": 0})
    error = await receive(communicator)
    refused = sorted({*DEVICES, GHOST} - set(mine))
    assert error["type"] == "error" and error["code"] == "unknown_device"
    assert all(repr(device) in error["message"] for device in refused), error
    assert not any(repr(device) in error["message"] for device in mine), error
    assert await receive(communicator) == {"type": "subscribed", "devices": sorted(mine)}
    replayed, _ = await collect(communicator, history)
    assert [e["id"] for e in replayed] == history
    await communicator.disconnect()


@pytest.mark.parametrize("subscription", ["*", "explicit"])
@pytest.mark.parametrize("user", USERS)
async def test_websocket_resume_replays_only_visible_devices(layer, world, user, subscription):
    mine = visible(user)
    history = await sync_to_async(world.events_of)(mine)
    communicator = await open_socket(world, user)
    devices: Any = "*" if subscription == "*" else list(DEVICES)
    await communicator.send_json_to({"op": "subscribe", "devices": devices})
    frame = await receive(communicator)
    if frame["type"] == "error":  # explicit, and some devices are invisible
        assert frame["code"] == "unknown_device"
        frame = await receive(communicator)
    assert frame["type"] == "subscribed"
    await communicator.send_json_to({"op": "resume", "after": 0})
    replayed, _ = await collect(communicator, history)
    assert [e["id"] for e in replayed] == history
    # And after a later id: only what followed, still only visible devices.
    await communicator.send_json_to({"op": "resume", "after": history[len(history) // 2] if history else 0})
    again, _ = await collect(communicator, history[len(history) // 2 + 1 :])
    assert [e["id"] for e in again] == history[len(history) // 2 + 1 :]
    await communicator.disconnect()


# --- HTTP API ------------------------------------------------------------------------------------------------


def api_client(world: World, user: str) -> Client:
    client = Client()
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {world.tokens[user]}"
    return client


def session_client(world: World, user: str) -> Client:
    client = Client()
    client.force_login(world.users[user])
    return client


@pytest.mark.parametrize("auth", ["token", "session"])
@pytest.mark.parametrize(("user", "device", "level"), CELLS)
def test_http_command(world, user, device, level, auth):
    expected = OUTCOMES[level]
    client = api_client(world, user) if auth == "token" else session_client(world, user)
    body = {"device": device, "name": "reboot", "params": {"n": 1}, "request_id": f"http-{auth}"}
    response = client.post("/api/commands", body, content_type="application/json")
    assert response.status_code == expected.http_command_status, response.content
    stored = reboots_by(world.users[user])
    if expected.command_state is None:
        assert response.json()["error"] == expected.command_error
        assert stored == []
        ghost = client.post("/api/commands", {**body, "device": GHOST}, content_type="application/json")
        assert ghost.status_code == response.status_code
        assert without(response.content.decode(), device) == without(ghost.content.decode(), GHOST)
    else:
        command = response.json()["command"]
        assert (command["device"], command["state"], command["error"] or "") == (
            device,
            expected.command_state,
            expected.command_error,
        )
        assert command["requested_by"] == user
        assert [(c.device_id, c.state, c.error) for c in stored] == [
            (device, expected.command_state, expected.command_error)
        ]


@pytest.mark.parametrize(("user", "device", "level"), CELLS)
def test_http_reads(world, user, device, level):
    expected = OUTCOMES[level]
    client = api_client(world, user)

    listing = client.get(f"/api/devices/{device}/commands")
    assert listing.status_code == expected.http_read_status, listing.content
    ghost = client.get(f"/api/devices/{GHOST}/commands")
    if expected.http_read_status == 200:
        assert [c["id"] for c in listing.json()["commands"]] == [world.commands[device]]
    else:
        assert listing.json()["error"] == "unknown_device"
        assert without(listing.content.decode(), device) == without(ghost.content.decode(), GHOST)

    detail = client.get(f"/api/commands/{world.commands[device]}")
    assert detail.status_code == expected.http_read_status, detail.content
    if expected.http_read_status == 200:
        assert detail.json()["command"]["device"] == device
    else:
        assert detail.json()["error"] == "unknown_command"
        unknown = client.get("/api/commands/0123456789abcdef0123456789abcdef")
        assert unknown.status_code == 404
        assert detail.json()["error"] == unknown.json()["error"]


# --- Console -------------------------------------------------------------------------------------------------


class ConsoleState(HTMLParser):
    """The JSON the console page starts from (``json_script``)."""

    def __init__(self) -> None:
        super().__init__()
        self._inside = False
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._inside = tag == "script" and ("id", "console-state") in attrs

    def handle_endtag(self, tag: str) -> None:
        self._inside = False

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.text += data

    @classmethod
    def of(cls, html: str) -> dict[str, Any]:
        parser = cls()
        parser.feed(html)
        return dict(json.loads(parser.text))


@pytest.mark.parametrize(("user", "device", "level"), CELLS)
def test_console_device_page(world, user, device, level):
    client = session_client(world, user)
    response = client.get(f"/devices/{device}/")
    assert response.status_code == OUTCOMES[level].http_read_status
    if response.status_code == 200:
        state = ConsoleState.of(response.content.decode())
        assert state["device"]["id"] == device
        assert {e["device"] for e in state["events"] + state["commands"]} == {device}
    else:
        ghost = client.get(f"/devices/{GHOST}/")
        assert ghost.status_code == 404
        assert without(response.content.decode(), device) == without(ghost.content.decode(), GHOST)


@pytest.mark.parametrize("user", USERS)
def test_console_fleet_list_and_state_list_only_visible_devices(world, user):
    client = session_client(world, user)
    assert client.get("/").status_code == 200  # the page itself lists devices from /api/devices
    listed = client.get("/api/devices", {"limit": 1000})
    assert listed.status_code == 200
    assert sorted(d["id"] for d in listed.json()["devices"]) == sorted(visible(user))
    state = client.get("/console/state.json")
    assert state.status_code == 200
    assert [d["id"] for d in state.json()["devices"]] == visible(user)
