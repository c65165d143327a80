"""The bridge engine against real brokers: the machine's Mosquitto (MQTT 5) and the embedded amqtt (3.1.1)."""

from __future__ import annotations

import asyncio
import uuid

import paho.mqtt.client as mqtt
import pytest
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from devices.models import BridgeHeartbeat, Device, Event
from devices.services import DATABASE_UNAVAILABLE
from gateway.events import EVENTS_GROUP
from mqtt_bridge import metrics
from mqtt_bridge.bridge import Bridge, BridgeSettings, StatusRole
from mqtt_bridge.client import MqttClient, MqttConfig
from mqtt_bridge.embedded_broker import EmbeddedBroker
from tests.support import free_port, require_mosquitto

pytestmark = [pytest.mark.django_db(transaction=True)]


def publisher(port: int, protocol: MQTTProtocolVersion = mqtt.MQTTv5) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}", protocol=protocol)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish_all(client: mqtt.Client, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
    for topic, payload in messages:
        info = client.publish(topic, payload, qos=qos)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        info.wait_for_publish(5)


def make_bridge(port: int, prefix: str, layer, *, protocol: str = "5", name: str | None = None) -> Bridge:
    name = name or f"test-bridge-{uuid.uuid4().hex[:8]}"
    config = MqttConfig(host="127.0.0.1", port=port, client_id=name, protocol=protocol, session_expiry=60)
    return Bridge(
        client_factory=lambda: MqttClient(config),
        channel_layer=layer,
        settings=BridgeSettings(
            name=name, topic_prefix=prefix, heartbeat_interval=0.2, backoff_initial=0.1, backoff_cap=0.5
        ),
    )


async def collect(layer, channel: str, count: int, timeout: float = 10.0) -> list[dict]:
    events: list[dict] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            message = await layer.receive(channel)
            events.extend(message["events"])
    return events


async def run_scenario(port: int, prefix: str, protocol: str) -> None:
    layer = InMemoryChannelLayer()
    channel = await layer.new_channel()
    await layer.group_add(EVENTS_GROUP, channel)
    bridge = make_bridge(port, prefix, layer, protocol=protocol)
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.wait_connected(), 10)
        rejected_before = metrics.REJECTED.labels("not_json")._value.get()
        client = await asyncio.to_thread(publisher, port, mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
        messages = [
            (
                f"{prefix}/dev-1/telemetry",
                b'{"temp": 21.5, "gps": {"lat": 1.5}, "seq": 1, "ts": 1700000000.5}',
            ),
            (f"{prefix}/dev-1/telemetry", b"{not json"),
            (f"{prefix}/bad$id/telemetry", b'{"temp": 1}'),
            (f"{prefix}/dev-1/status", b"online"),
            (
                f"{prefix}/dev-2/events",
                b'{"name": "door", "severity": "warning", "message": "open", "zone": 3}',
            ),
        ]
        await asyncio.to_thread(publish_all, client, messages)
        events = await collect(layer, channel, 3)
        frames = {e["device"] + ":" + e["frame"].split('"type":"')[1].split('"')[0]: e for e in events}
        assert set(frames) == {"dev-1:telemetry", "dev-1:status", "dev-2:event"}
        assert '"values":{"temp":21.5,"gps.lat":1.5}' in frames["dev-1:telemetry"]["frame"]
        assert '"device_ts":1700000000.5' in frames["dev-1:telemetry"]["frame"]
        assert '"data":{"zone":3}' in frames["dev-2:event"]["frame"]
        assert metrics.REJECTED.labels("not_json")._value.get() == rejected_before + 1
        stored = await sync_to_async(
            lambda: list(Event.objects.order_by("id").values_list("device_id", "kind", "seq"))
        )()
        assert stored == [("dev-1", "telemetry", 1), ("dev-1", "status", None), ("dev-2", "event", None)]
        device = await sync_to_async(Device.objects.get)(id="dev-1")
        assert device.online and device.latest == {"temp": 21.5, "gps.lat": 1.5}
        await asyncio.sleep(0.3)
        beat = await sync_to_async(BridgeHeartbeat.objects.get)(name=bridge.settings.name)
        assert beat.connected
        await asyncio.to_thread(client.loop_stop)
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 10)
    beat = await sync_to_async(BridgeHeartbeat.objects.get)(name=bridge.settings.name)
    assert not beat.connected


@pytest.mark.mosquitto
async def test_bridge_on_mosquitto_mqtt5(prefix):
    _, port = require_mosquitto()
    await run_scenario(port, prefix, "5")


async def test_bridge_on_the_embedded_broker_mqtt311(prefix):
    port = free_port()
    broker = EmbeddedBroker(host="127.0.0.1", port=port)
    await broker.start()
    try:
        await run_scenario(port, prefix, "3.1.1")
    finally:
        await broker.stop()


async def test_bridge_reconnects_and_resubscribes_after_a_broker_restart(private_mosquitto, prefix):
    layer = InMemoryChannelLayer()
    channel = await layer.new_channel()
    await layer.group_add(EVENTS_GROUP, channel)
    bridge = make_bridge(private_mosquitto.port, prefix, layer)
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.wait_connected(), 10)
        await asyncio.to_thread(private_mosquitto.stop)
        await asyncio.sleep(0.5)
        assert not bridge.connected
        await asyncio.to_thread(private_mosquitto.start)
        await asyncio.wait_for(bridge.wait_connected(), 15)
        client = await asyncio.to_thread(publisher, private_mosquitto.port)
        await asyncio.to_thread(publish_all, client, [(f"{prefix}/dev-9/telemetry", b'{"v": 1}')])
        events = await collect(layer, channel, 1)
        assert events[0]["device"] == "dev-9"
        await asyncio.to_thread(client.loop_stop)
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 10)


async def test_bridge_started_without_a_broker_keeps_trying(prefix):
    port = free_port()
    bridge = make_bridge(port, prefix, InMemoryChannelLayer())
    task = asyncio.create_task(bridge.run())
    await asyncio.sleep(1.0)
    assert not task.done() and not bridge.connected and "cannot connect" in bridge.last_error
    bridge.stop()
    await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("outage", DATABASE_UNAVAILABLE)
async def test_the_status_role_keeps_what_it_had_while_the_database_is_away(outage):
    """A lease renewal that fails because the database is down or its connection lost changes nothing (the lease
    decides again once it answers); the bridge's loop must not die of it."""

    class AwayStore:
        async def hold_lease(self, **kwargs: object) -> bool:
            raise outage("connection refused")

        async def release_lease(self, **kwargs: object) -> None:
            raise outage("connection refused")

    role = StatusRole(store=AwayStore(), owner="b1", ttl=10, contested=True)  # type: ignore[arg-type]
    role.held = True
    assert await role.claim() is False and role.held
    await role.release()
    assert not role.held
