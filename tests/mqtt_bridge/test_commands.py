"""Commands end to end on the machine's Mosquitto: WebSocket -> stored -> bridge -> paho device -> reply -> socket."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, channel_layers
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.utils import timezone
from paho.mqtt.enums import CallbackAPIVersion

from devices import services
from devices.models import Command, Device
from devices.permissions import access_for
from devices.services import DATABASE_UNAVAILABLE
from gateway.events import COMMANDS_GROUP
from gateway.routing import build_application
from mqtt_bridge import metrics
from mqtt_bridge.bridge import Bridge, BridgeSettings
from mqtt_bridge.client import MqttClient, MqttConfig
from mqtt_bridge.commands import CommandDispatcher, CommandSettings
from mqtt_bridge.store import BridgeStore
from mqtt_bridge.topics import Topics
from tests.support import PahoDevice, require_mosquitto

pytestmark = [pytest.mark.mosquitto, pytest.mark.django_db(transaction=True)]


@dataclass
class Harness:
    bridge: Bridge
    communicator: WebsocketCommunicator
    prefix: str
    port: int

    async def frames(self, predicate, timeout: float = 10.0) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            frame = json.loads(await self.communicator.receive_from(timeout=max(0.01, deadline - time.monotonic())))
            for item in frame["events"] if frame.get("type") == "batch" else [frame]:
                seen.append(item)
                if predicate(item):
                    return seen

    async def command(self, **frame: Any) -> None:
        await self.communicator.send_json_to({"op": "command", **frame})


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    _, port = require_mosquitto()
    layer = InMemoryChannelLayer()
    previous = channel_layers.set("default", layer)
    prefix = f"t{uuid.uuid4().hex[:8]}/devices"
    name = f"cmd-{uuid.uuid4().hex[:6]}"
    bridge = Bridge(
        client_factory=lambda: MqttClient(MqttConfig(host="127.0.0.1", port=port, client_id=name)),
        channel_layer=layer,
        settings=BridgeSettings(name=name, topic_prefix=prefix, commands=CommandSettings(poll_interval=0.2, lease=2)),
    )
    task = asyncio.create_task(bridge.run())

    @sync_to_async
    def setup() -> str:
        Device.objects.create(id="dev-1", online=True)
        user = get_user_model().objects.create_superuser(username="op", password="x")
        return services.issue_token(user=user)

    token = await setup()
    communicator = WebsocketCommunicator(build_application(http_app=None), f"/ws/?token={token}")
    await asyncio.wait_for(bridge.wait_connected(), 10)
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()
    await communicator.send_json_to({"op": "subscribe", "devices": ["dev-1"]})
    assert (await communicator.receive_json_from())["type"] == "subscribed"
    yield Harness(bridge=bridge, communicator=communicator, prefix=prefix, port=port)
    await communicator.disconnect()
    bridge.stop()
    await asyncio.wait_for(task, 10)
    if previous is not None:
        channel_layers.set("default", previous)


async def test_round_trip_from_a_websocket_to_a_device_and_back(harness):
    device = await asyncio.to_thread(PahoDevice(harness.port, harness.prefix, "dev-1").start)
    try:
        await harness.command(device="dev-1", name="reboot", params={"delay": 1}, request_id="r-1")
        frames = await harness.frames(lambda f: f.get("state") == "succeeded")
        commands = [f for f in frames if f["type"] == "command"]
        assert [f["state"] for f in commands] == ["pending", "sent", "succeeded"]
        assert all(f["request_id"] == "r-1" and f["device"] == "dev-1" and f["name"] == "reboot" for f in commands)
        assert commands[-1]["result"] == {"echo": {"delay": 1}}
        assert len({f["command_id"] for f in commands}) == 1
        [payload] = device.received
        assert payload["topic"] == f"{harness.prefix}/dev-1/commands/reboot" and not payload["retain"]
        assert payload["id"] == commands[0]["command_id"] and payload["params"] == {"delay": 1}
        assert payload["expires"] > payload["ts"] and 0 < payload["ttl"] <= 30
        assert device.properties[0].ResponseTopic == f"{harness.prefix}/dev-1/replies"
        assert device.properties[0].CorrelationData == payload["id"].encode()
    finally:
        await asyncio.to_thread(device.stop)


async def test_a_failed_reply_is_a_failed_command(harness):
    device = await asyncio.to_thread(PahoDevice(harness.port, harness.prefix, "dev-1", ok=False).start)
    try:
        await harness.command(device="dev-1", name="open", request_id="r-2")
        frames = await harness.frames(lambda f: f.get("state") == "failed")
        assert frames[-1]["error"] == "jammed"
    finally:
        await asyncio.to_thread(device.stop)


async def test_no_reply_before_the_deadline_expires_the_command(harness):
    device = await asyncio.to_thread(PahoDevice(harness.port, harness.prefix, "dev-1", answer=False).start)
    try:
        started = time.monotonic()
        await harness.command(device="dev-1", name="slow", request_id="r-3", timeout=1)
        frames = await harness.frames(lambda f: f.get("state") == "expired", timeout=8)
        assert [f["state"] for f in frames if f["type"] == "command"] == ["pending", "sent", "expired"]
        assert time.monotonic() - started < 4
        assert len(device.received) == 1
    finally:
        await asyncio.to_thread(device.stop)


async def test_a_repeated_request_id_returns_the_existing_command_and_publishes_nothing(harness):
    device = await asyncio.to_thread(PahoDevice(harness.port, harness.prefix, "dev-1").start)
    try:
        await harness.command(device="dev-1", name="reboot", request_id="same")
        first = await harness.frames(lambda f: f.get("state") == "succeeded")
        await harness.command(device="dev-1", name="reboot", request_id="same")
        again = await harness.frames(lambda f: f.get("type") == "command")
        assert again[-1]["command_id"] == first[-1]["command_id"] and again[-1]["state"] == "succeeded"
        await asyncio.sleep(0.5)
        assert len(device.received) == 1
        assert await sync_to_async(Command.objects.count)() == 1
    finally:
        await asyncio.to_thread(device.stop)


async def test_a_reply_for_an_unknown_id_changes_nothing_and_is_counted(harness):
    before = metrics.REPLIES.labels("unknown")._value.get()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"x-{uuid.uuid4().hex[:6]}")
    await asyncio.to_thread(client.connect, "127.0.0.1", harness.port)
    client.loop_start()
    info = client.publish(f"{harness.prefix}/dev-1/replies", json.dumps({"id": "deadbeef", "ok": True}), qos=1)
    await asyncio.to_thread(info.wait_for_publish, 5)
    for _ in range(50):
        if metrics.REPLIES.labels("unknown")._value.get() > before:
            break
        await asyncio.sleep(0.05)
    assert metrics.REPLIES.labels("unknown")._value.get() == before + 1
    client.loop_stop()
    assert await harness.communicator.receive_nothing(timeout=0.2)


async def test_hostile_names_and_ids_are_rejected_and_never_published(harness):
    seen: list[str] = []
    spy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"spy-{uuid.uuid4().hex[:6]}")
    subscribed = threading.Event()
    spy.on_connect = lambda c, u, f, r, p: c.subscribe("#", qos=1)
    spy.on_subscribe = lambda *args: subscribed.set()
    spy.on_message = lambda c, u, m: seen.append(m.topic)
    await asyncio.to_thread(spy.connect, "127.0.0.1", harness.port)
    spy.loop_start()
    assert await asyncio.to_thread(subscribed.wait, 5)
    hostile = ["+", "#", "a/b", "x\x00y", "$SYS", "../x", ""]
    try:
        for value in hostile:
            await harness.command(device="dev-1", name=value, request_id=f"n-{len(value)}")
            error = await harness.communicator.receive_json_from()
            assert error["type"] == "error" and error["code"] == "bad_command", (value, error)
            await harness.command(device=value, name="reboot", request_id=f"d-{len(value)}")
            error = await harness.communicator.receive_json_from()
            assert error["type"] == "error" and error["code"] == "unknown_device", (value, error)
        await asyncio.sleep(1.0)
        assert not [topic for topic in seen if "/commands/" in topic], seen
        assert await sync_to_async(Command.objects.count)() == 0
    finally:
        spy.loop_stop()


async def test_a_command_left_unconfirmed_by_a_crash_is_published_again_with_the_same_id(harness):
    """A bridge published and died before recording `sent`: the lease lapses, and the command goes out again with
    the same id while still in time. The device deduplicates by id."""
    device = await asyncio.to_thread(PahoDevice(harness.port, harness.prefix, "dev-1").start)

    @sync_to_async
    def crashed_command() -> str:
        user = get_user_model().objects.get(username="op")
        outcome = services.request_command(
            user=user,
            access=access_for(user),
            device_id="dev-1",
            name="reboot",
            params={},
            request_id="crash",
            timeout=30,
            offline_policy="reject",
            max_payload=65536,
        )
        Command.objects.filter(id=outcome.command.id).update(
            attempts=1, lease_owner="dead-bridge", lease_until=timezone.now()
        )
        return outcome.command.id

    try:
        command_id = await crashed_command()
        frames = await harness.frames(lambda f: f.get("state") == "succeeded")
        assert frames[-1]["command_id"] == command_id
        assert [p["id"] for p in device.received] == [command_id]
        assert await sync_to_async(lambda: Command.objects.get(id=command_id).attempts)() == 2
    finally:
        await asyncio.to_thread(device.stop)


@pytest.mark.parametrize("outage", DATABASE_UNAVAILABLE)
async def test_command_publishing_outlives_a_database_outage(harness, monkeypatch, outage):
    """The publisher's claim failing (database down, or its connection lost) must not end it: a command requested
    afterwards is published."""
    store = harness.bridge.commands._store
    real_claim = store.claim_commands
    failures = 0

    async def claim_while_down(**kwargs: Any) -> Any:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise outage("connection refused")
        return await real_claim(**kwargs)

    monkeypatch.setattr(store, "claim_commands", claim_while_down)
    device = await asyncio.to_thread(PahoDevice(harness.port, harness.prefix, "dev-1").start)
    try:
        await harness.command(device="dev-1", name="reboot", request_id="r-db")
        frames = await harness.frames(lambda f: f.get("state") == "succeeded")
        assert failures == 3
        assert [f["state"] for f in frames if f["type"] == "command"] == ["pending", "sent", "succeeded"]
    finally:
        await asyncio.to_thread(device.stop)


class RenewalsLayer(InMemoryChannelLayer):
    """Records each group_add (the first joins, the others renew)."""

    def __init__(self) -> None:
        super().__init__()
        self.adds: list[tuple[str, str]] = []

    async def group_add(self, group: str, channel: str) -> None:
        self.adds.append((group, channel))
        await super().group_add(group, channel)


async def test_the_wake_up_channel_renews_its_group_membership(monkeypatch):
    """The layer's group expiry drops members that are not renewed (a dead bridge's): a live bridge renews its
    wake-up channel, or it would stop being woken and wait for the poll."""
    monkeypatch.setattr("mqtt_bridge.commands.GROUP_REFRESH", 0.02)
    layer = RenewalsLayer()

    async def announce(events: list[Any]) -> None:
        return None

    dispatcher = CommandDispatcher(
        owner="b",
        store=BridgeStore(auto_register=True, max_devices=10),
        layer=layer,
        topics=Topics("devices"),
        settings=CommandSettings(),
        announce=announce,
    )
    listening = asyncio.create_task(dispatcher.listen_for_wakeups())
    await asyncio.sleep(0.2)
    listening.cancel()
    assert len(layer.adds) >= 4 and {group for group, _ in layer.adds} == {COMMANDS_GROUP}
    assert len({channel for _, channel in layer.adds}) == 1, "renewals are for the one channel it listens on"
