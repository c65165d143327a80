"""The WebSocket protocol through Channels' WebsocketCommunicator, with the real hub and in-memory layer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from devices import services
from devices.models import Device, Fleet, FleetAccess
from devices.records import EventKind, EventRecord, Observation
from gateway import metrics
from gateway.backpressure import WriteGate
from gateway.consumers import EventsConsumer
from gateway.events import EVENTS_GROUP, EventsPublisher
from gateway.hub import Hub
from gateway.routing import build_application

pytestmark = [pytest.mark.django_db(transaction=True)]

APP = build_application(http_app=None)
publisher = EventsPublisher(source="tests")


@sync_to_async
def make_user(username: str = "op", *, superuser: bool = True) -> tuple[Any, str]:
    model = get_user_model()
    user = (model.objects.create_superuser if superuser else model.objects.create_user)(
        username=username, password="pw"
    )
    return user, services.issue_token(user=user)


@sync_to_async
def store(*pairs: tuple[str, float]) -> list[EventRecord]:
    observations = [
        Observation(device_id=d, kind=EventKind.TELEMETRY, received_at=time.time(), body={"values": {"v": v}})
        for d, v in pairs
    ]
    return services.ingest(observations=observations, auto_register=True, max_devices=1000).stored


@sync_to_async
def grant_view(user: Any, device_id: str) -> None:
    """Let ``user`` view one device, through a group and a fleet."""
    from django.contrib.auth.models import Group

    group = Group.objects.create(name=f"view-{device_id}")
    user.groups.add(group)
    fleet = Fleet.objects.create(name=f"fleet-{device_id}")
    fleet.devices.add(Device.objects.get(id=device_id))
    FleetAccess.objects.create(fleet=fleet, group=group, level="view")


async def announce(layer, records: list[EventRecord]) -> None:
    await layer.group_send(EVENTS_GROUP, publisher.message(records))


async def connect(token: str | None = None, headers: list[tuple[bytes, bytes]] | None = None, query: str = ""):
    path = f"/ws/?token={token}" if token else f"/ws/{query}"
    communicator = WebsocketCommunicator(APP, path, headers=headers or [])
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def frames_until(communicator, predicate, timeout: float = 3.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while True:
        frame = json.loads(await communicator.receive_from(timeout=timeout))
        for item in frame["events"] if frame.get("type") == "batch" else [frame]:
            seen.append(item)
            if predicate(item):
                return seen


async def hello_and_subscribe(communicator, frame: dict[str, Any]) -> dict[str, Any]:
    hello = await communicator.receive_json_from()
    assert hello["type"] == "hello" and hello["protocol"] == 1
    await communicator.send_json_to(frame)
    return hello


async def test_unauthenticated_socket_is_accepted_then_closed_with_4401(layer):
    communicator = WebsocketCommunicator(APP, "/ws/")
    connected, _ = await communicator.connect()
    assert connected
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4401}
    bad_token = WebsocketCommunicator(APP, "/ws/?token=gw_wrong")
    await bad_token.connect()
    assert await bad_token.receive_output() == {"type": "websocket.close", "code": 4401}


async def test_session_socket_needs_an_allowed_origin(layer):
    await make_user()
    client = Client()
    await sync_to_async(client.login)(username="op", password="pw")
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    foreign = WebsocketCommunicator(APP, "/ws/", headers=[(b"cookie", cookie), (b"origin", b"https://evil.example")])
    await foreign.connect()
    assert await foreign.receive_output() == {"type": "websocket.close", "code": 4403}
    missing = WebsocketCommunicator(APP, "/ws/", headers=[(b"cookie", cookie)])
    await missing.connect()
    assert await missing.receive_output() == {"type": "websocket.close", "code": 4403}
    allowed = await connect(headers=[(b"cookie", cookie), (b"origin", b"http://localhost:8000")])
    assert (await allowed.receive_json_from())["user"] == "op"
    await allowed.disconnect()


async def test_token_in_an_authorization_header(layer):
    _, token = await make_user()
    communicator = await connect(headers=[(b"authorization", f"Bearer {token}".encode())])
    assert (await communicator.receive_json_from())["type"] == "hello"
    await communicator.disconnect()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('{"op": "dance"}', "unknown_op"),
        ('{"nop": 1}', "unknown_op"),
        ('{"op": "subscribe", "devices": "all"}', "bad_frame"),
        ('{"op": "subscribe", "devices": [1]}', "bad_frame"),
        ('{"op": "subscribe", "devices": ["a"], "after": -1}', "bad_frame"),
        ('{"op": "subscribe", "devices": ["a"], "after": true}', "bad_frame"),
        ('{"op": "resume"}', "bad_frame"),
        ('{"op": "subscribe", "devices": ["dev/+/#", "x\\u0000"]}', "unknown_device"),
        ('{"op": "command", "device": "nope", "name": "reboot", "request_id": "r1"}', "unknown_device"),
        ('{"op": "command", "device": "a", "name": 5}', "bad_frame"),
        ('{"op": "ping", "pad": "' + "x" * 140000 + '"}', "too_large"),
    ],
)
async def test_a_bad_frame_gets_an_error_and_the_socket_stays_open(layer, frame, code):
    _, token = await make_user()
    communicator = await connect(token)
    await communicator.receive_json_from()
    await communicator.send_to(text_data=frame)
    error = await communicator.receive_json_from()
    assert error["type"] == "error" and error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    await communicator.send_json_to({"op": "ping"})
    reply = await communicator.receive_json_from()
    while reply["type"] != "pong":
        reply = await communicator.receive_json_from()
    await communicator.disconnect()


async def test_binary_frames_are_refused_politely(layer):
    _, token = await make_user()
    communicator = await connect(token)
    await communicator.receive_json_from()
    await communicator.send_to(bytes_data=b"\x00\x01")
    assert (await communicator.receive_json_from())["code"] == "bad_frame"
    await communicator.disconnect()


async def test_live_events_reach_only_subscribed_devices_in_batches(layer):
    _, token = await make_user()
    await store(("a", 0), ("b", 0))
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["a"]})
    assert await communicator.receive_json_from() == {"type": "subscribed", "devices": ["a"]}
    await Hub.for_layer(layer).ready.wait()
    records = await store(("a", 1), ("b", 2), ("a", 3))
    await announce(layer, records)
    seen = await frames_until(communicator, lambda f: f.get("values") == {"v": 3})
    assert [(f["device"], f["values"]["v"]) for f in seen] == [("a", 1), ("a", 3)]
    assert all(f["type"] == "telemetry" and f["id"] and f["ts"] for f in seen)
    await communicator.send_json_to({"op": "unsubscribe", "devices": ["a"]})
    assert await communicator.receive_json_from() == {"type": "subscribed", "devices": []}
    await announce(layer, await store(("a", 4)))
    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect()


async def test_unknown_and_invisible_devices_get_the_same_error(layer):
    await store(("secret", 0), ("mine", 0))
    user, token = await make_user("viewer", superuser=False)
    await grant_view(user, "mine")
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["secret", "mine"]})
    error = await communicator.receive_json_from()
    assert error["code"] == "unknown_device" and "secret" in error["message"]
    assert await communicator.receive_json_from() == {"type": "subscribed", "devices": ["mine"]}
    await communicator.send_json_to({"op": "subscribe", "devices": ["ghost"]})
    ghost = await communicator.receive_json_from()
    assert ghost["code"] == "unknown_device"
    assert error["message"].replace("secret", "X") == ghost["message"].replace("ghost", "X")
    await communicator.disconnect()


async def test_wildcard_delivers_only_what_the_user_may_view(layer):
    await store(("secret", 0), ("mine", 0))
    user, token = await make_user("viewer", superuser=False)
    await grant_view(user, "mine")
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": "*", "after": 0})
    assert await communicator.receive_json_from() == {"type": "subscribed", "devices": "*"}
    replayed = await frames_until(communicator, lambda f: f.get("device") == "mine")
    assert [f["device"] for f in replayed if f["type"] != "gap"] == ["mine"]
    await Hub.for_layer(layer).ready.wait()
    await announce(layer, await store(("secret", 1), ("mine", 2)))
    live = await frames_until(communicator, lambda f: f.get("values") == {"v": 2})
    assert [f["device"] for f in live] == ["mine"]
    await communicator.disconnect()


async def test_subscribe_after_replays_then_goes_live_without_gap_or_duplicate(layer):
    """Events are stored and announced continuously while the client subscribes with ``after``."""
    _, token = await make_user()
    first = await store(*[("a", i) for i in range(20)])
    watcher = await connect(token)  # keeps the hub running from the start
    await watcher.receive_json_from()
    await Hub.for_layer(layer).ready.wait()
    stored: list[int] = [r.id for r in first]
    stop = asyncio.Event()

    async def produce() -> None:
        i = 100
        while not stop.is_set():
            records = await store(("a", i), ("b", i))
            stored.extend(r.id for r in records if r.device_id == "a")
            await announce(layer, records)
            i += 1
            await asyncio.sleep(0)

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.05)
    after = first[9].id
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["a"], "after": after})
    assert (await communicator.receive_json_from())["type"] == "subscribed"
    await asyncio.sleep(0.3)
    stop.set()
    await producer
    last = stored[-1]
    seen = await frames_until(communicator, lambda f: f["id"] == last)
    ids = [f["id"] for f in seen]
    assert ids == [i for i in stored if i > after], "replay + live must be every id after `after`, once, in order"
    await communicator.disconnect()
    await watcher.disconnect()


async def test_resume_replays_what_the_subscriptions_missed(layer):
    _, token = await make_user()
    records = await store(("a", 1), ("b", 2), ("a", 3))
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["a"]})
    await communicator.receive_json_from()
    await communicator.send_json_to({"op": "resume", "after": records[0].id})
    seen = await frames_until(communicator, lambda f: f["id"] == records[2].id)
    assert [f["id"] for f in seen] == [records[2].id]
    await communicator.disconnect()


async def test_a_replay_beyond_the_cap_starts_with_a_gap(layer, settings):
    settings.GATEWAY = {**settings.GATEWAY, "REPLAY_MAX": 3}
    _, token = await make_user()
    records = await store(*[("a", i) for i in range(6)])
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["a"], "after": 0})
    await communicator.receive_json_from()
    gap = await communicator.receive_json_from()
    assert gap == {"type": "gap", "from": 1, "to": records[2].id}
    seen = await frames_until(communicator, lambda f: f["id"] == records[5].id)
    assert [f["id"] for f in seen] == [r.id for r in records[3:]]
    await communicator.disconnect()


async def test_a_batch_lost_in_the_layer_is_caught_up_from_the_database(layer):
    _, token = await make_user()
    await store(("a", 0))
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["a"]})
    await communicator.receive_json_from()
    await Hub.for_layer(layer).ready.wait()
    source = EventsPublisher(source="lossy")
    first, lost, third = await store(("a", 1)), await store(("a", 2)), await store(("a", 3))
    await layer.group_send(EVENTS_GROUP, source.message(first))
    source.message(lost)  # numbered, never sent: as if the layer dropped it
    await layer.group_send(EVENTS_GROUP, source.message(third))
    seen = []
    while len(seen) < 3:
        frame = await communicator.receive_json_from()
        seen.extend(frame["events"] if frame["type"] == "batch" else [frame])
    assert [(f["type"], f["id"]) for f in seen] == [("telemetry", r.id) for r in (first[0], lost[0], third[0])]
    await communicator.disconnect()


async def test_a_slow_socket_gets_a_gap_instead_of_unbounded_memory(layer, settings):
    settings.GATEWAY = {**settings.GATEWAY, "WS_QUEUE_MAX": 10}
    _, token = await make_user()
    await store(("a", 0))
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["a"]})
    await communicator.receive_json_from()
    hub = Hub.for_layer(layer)
    await hub.ready.wait()
    records = await store(*[("a", i) for i in range(50)])
    await hub.dispatch(dict(publisher.message(records)))  # one burst, routed before the sender runs
    events = await frames_until(communicator, lambda f: f["type"] == "gap")
    delivered = [e["id"] for e in events if e["type"] == "telemetry"]
    gaps = [e for e in events if e["type"] == "gap"]
    assert await communicator.receive_nothing(timeout=0.2)
    assert delivered == [r.id for r in records[:10]]
    assert gaps == [{"type": "gap", "from": records[10].id, "to": records[-1].id}]
    await communicator.disconnect()


async def test_a_client_that_reads_nothing_is_closed_with_4408(layer, settings, monkeypatch):
    """Its transport's send buffer stays full (the gate shut) for GATEWAY_WS_STALL_TIMEOUT: closed, counted."""
    settings.GATEWAY = {**settings.GATEWAY, "WS_STALL_TIMEOUT": 0.2}
    shut = WriteGate()
    shut.pauseProducing()
    monkeypatch.setattr(WriteGate, "for_send", classmethod(lambda cls, send: shut))
    before = metrics.WS_STALLED._value.get()
    _, token = await make_user()
    communicator = await connect(token)
    assert (await communicator.receive_json_from())["type"] == "hello"  # control frames do not wait for the gate
    assert (await communicator.receive_output(timeout=3))["code"] == 4408
    assert metrics.WS_STALLED._value.get() == before + 1


async def test_a_frame_that_cannot_be_sent_closes_the_socket_instead_of_silencing_it(layer, monkeypatch):
    _, token = await make_user()
    await store(("a", 0))
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["a"]})
    await communicator.receive_json_from()
    hub = Hub.for_layer(layer)
    await hub.ready.wait()
    original = EventsConsumer.send

    async def refusing(self: EventsConsumer, text_data: str | None = None, **kwargs: Any) -> None:
        if text_data and '"telemetry"' in text_data:
            raise ValueError("message too large for the server")  # as Autobahn's PayloadExceededError
        await original(self, text_data=text_data, **kwargs)

    monkeypatch.setattr(EventsConsumer, "send", refusing)
    await hub.dispatch(dict(publisher.message(await store(("a", 1)))))
    assert (await communicator.receive_output(timeout=3))["code"] == 1011


async def test_an_after_beyond_the_last_id_does_not_hide_later_events(layer):
    _, token = await make_user()
    await store(("a", 0))
    communicator = await connect(token)
    await hello_and_subscribe(communicator, {"op": "subscribe", "devices": ["a"], "after": 2**62})
    assert (await communicator.receive_json_from())["type"] == "subscribed"
    await Hub.for_layer(layer).ready.wait()
    records = await store(("a", 1))
    await announce(layer, records)
    seen = await frames_until(communicator, lambda f: f.get("id") == records[0].id)
    assert [f["id"] for f in seen] == [records[0].id]
    await communicator.disconnect()


@sync_to_async
def stored_commands() -> int:
    from devices.models import Command

    return Command.objects.count()


async def test_a_command_is_refused_explicitly_while_the_hub_is_out_of_the_layer(layer):
    """With the layer down the command's states could not reach the socket: refused, and nothing stored."""
    _, token = await make_user()
    await store(("a", 0))
    communicator = await connect(token)
    await communicator.receive_json_from()
    hub = Hub.for_layer(layer)
    await hub.ready.wait()
    hub.ready.clear()  # what the hub does when a layer operation fails, until it is back in the group
    await communicator.send_json_to({"op": "command", "device": "a", "name": "reboot", "request_id": "r1"})
    error = await communicator.receive_json_from()
    assert (error["type"], error["code"], error["ref"]) == ("error", "unavailable", "r1"), error
    assert await stored_commands() == 0
    await communicator.disconnect()


async def test_a_command_is_refused_explicitly_when_the_database_is_unavailable(layer, monkeypatch):
    """A database outage answers the command with an error frame; the socket stays open."""
    from django.db import OperationalError

    from gateway import consumers

    async def database_down(**kwargs: Any) -> None:
        raise OperationalError("connection refused")

    _, token = await make_user()
    await store(("a", 0))
    communicator = await connect(token)
    await communicator.receive_json_from()
    await Hub.for_layer(layer).ready.wait()
    monkeypatch.setattr(consumers, "_request_command", database_down)
    await communicator.send_json_to({"op": "command", "device": "a", "name": "reboot", "request_id": "r2"})
    error = await communicator.receive_json_from()
    assert (error["code"], error["ref"]) == ("unavailable", "r2"), error
    await communicator.send_json_to({"op": "ping"})
    assert (await communicator.receive_json_from())["type"] == "pong"
    await communicator.disconnect()


async def test_a_consumer_cancelled_before_its_disconnect_still_leaves_the_hub_and_the_count(layer):
    """Daphne cancels an application still busy ``application_close_timeout`` after its client left (seen in a mass
    disconnect): the socket must not stay attached to the hub, watched and counted."""
    _, token = await make_user()
    hub = Hub.for_layer(layer)
    before = len(hub._all), metrics.WS_CLIENTS._value.get()
    communicator = await connect(token)
    await frames_until(communicator, lambda frame: frame["type"] == "hello")
    assert len(hub._all) == before[0] + 1 and metrics.WS_CLIENTS._value.get() == before[1] + 1
    communicator.future.cancel()  # as Daphne does; no websocket.disconnect is ever dispatched
    with contextlib.suppress(asyncio.CancelledError):
        await communicator.future
    assert (len(hub._all), metrics.WS_CLIENTS._value.get()) == before
