"""The whole pipeline in one process: a paho device -> broker -> Bridge -> channel layer -> hub -> consumer,
read through Channels' WebsocketCommunicator. Both brokers (Mosquitto, embedded amqtt) x both layers."""

from __future__ import annotations

import asyncio
import json
import uuid

import paho.mqtt.client as mqtt
import pytest
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, channel_layers
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer
from django.contrib.auth import get_user_model
from paho.mqtt.enums import CallbackAPIVersion

from devices import services
from mqtt_bridge.bridge import Bridge, BridgeSettings
from mqtt_bridge.client import MqttClient, MqttConfig
from mqtt_bridge.embedded_broker import EmbeddedBroker
from tests.support import free_port, require_mosquitto, require_redis

pytestmark = [pytest.mark.django_db(transaction=True)]


def make_layer(kind: str):
    if kind == "memory":
        return InMemoryChannelLayer()
    url = require_redis()
    return RedisChannelLayer(hosts=[{"address": url, "socket_timeout": None}], prefix=f"t{uuid.uuid4().hex[:6]}")


@pytest.fixture(params=["mosquitto", "embedded"])
async def broker(request):
    if request.param == "mosquitto":
        yield require_mosquitto()[1], "5"
        return
    port = free_port()
    embedded = EmbeddedBroker(host="127.0.0.1", port=port)
    await embedded.start()
    yield port, "3.1.1"
    await embedded.stop()


@pytest.mark.parametrize("layer_kind", ["memory", "redis"])
async def test_a_device_message_reaches_a_websocket_client(broker, layer_kind):
    from gateway.routing import build_application

    port, protocol = broker
    layer = make_layer(layer_kind)
    previous = channel_layers.set("default", layer)
    prefix = f"t{uuid.uuid4().hex[:8]}/devices"
    name = f"pipe-{uuid.uuid4().hex[:6]}"
    bridge = Bridge(
        client_factory=lambda: MqttClient(MqttConfig(host="127.0.0.1", port=port, client_id=name, protocol=protocol)),
        channel_layer=layer,
        settings=BridgeSettings(name=name, topic_prefix=prefix),
    )
    task = asyncio.create_task(bridge.run())
    user = await sync_to_async(get_user_model().objects.create_superuser)(username="pipe", password="x")
    token = await sync_to_async(services.issue_token)(user=user)
    communicator = WebsocketCommunicator(build_application(http_app=None), f"/ws/?token={token}")
    device = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"dev-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )
    try:
        await asyncio.wait_for(bridge.wait_connected(), 10)
        connected, _ = await communicator.connect()
        assert connected
        hello = await communicator.receive_json_from()
        await communicator.send_json_to({"op": "subscribe", "devices": "*", "after": hello["last_id"]})
        assert (await communicator.receive_json_from())["type"] == "subscribed"
        await asyncio.to_thread(device.connect, "127.0.0.1", port)
        device.loop_start()
        info = device.publish(f"{prefix}/pipe-1/telemetry", b'{"temp": 20.5, "seq": 1}', qos=1)
        await asyncio.to_thread(info.wait_for_publish, 5)
        frame = json.loads(await communicator.receive_from(timeout=10))
        events = frame["events"] if frame["type"] == "batch" else [frame]
        assert events[0]["type"] == "telemetry" and events[0]["device"] == "pipe-1"
        assert events[0]["values"] == {"temp": 20.5} and events[0]["id"] > hello["last_id"]
    finally:
        device.loop_stop()
        await communicator.disconnect()
        bridge.stop()
        await asyncio.wait_for(task, 10)
        if previous is not None:
            channel_layers.set("default", previous)
        if layer_kind == "redis":
            await layer.flush()
