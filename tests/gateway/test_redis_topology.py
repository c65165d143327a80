"""The production topology on one machine: Daphne and ``runbridge`` as separate processes joined by Redis."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
import uuid

import paho.mqtt.client as mqtt
import pytest
import redis
from django.contrib.auth import get_user_model
from paho.mqtt.enums import CallbackAPIVersion
from websockets.sync.client import connect

from devices import services
from tests.support import (
    MQTT_PORT,
    GatewayProcess,
    free_port,
    gateway_env,
    http_ok,
    manage,
    require_mosquitto,
    require_redis,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.redis,
    pytest.mark.mosquitto,
    pytest.mark.django_db(transaction=True),
]


def publish(topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}")
    client.connect("127.0.0.1", MQTT_PORT)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def next_telemetry(ws, timeout: float) -> dict:
    """The next telemetry event (a late status frame for the registration may come first)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        for event in frame["events"] if frame["type"] == "batch" else [frame]:
            if event["type"] == "telemetry":
                return event


def test_events_cross_redis_from_the_bridge_to_daphne_even_after_an_idle_spell():
    require_mosquitto()
    redis_url = require_redis()
    redis.Redis.from_url(redis_url).flushdb()
    prefix = f"t{uuid.uuid4().hex[:8]}/devices"
    env = gateway_env(
        REDIS_URL=redis_url,
        MQTT_URL=f"mqtt://127.0.0.1:{MQTT_PORT}",
        GATEWAY_TOPIC_PREFIX=prefix,
        GATEWAY_MQTT_CLIENT_ID=f"redis-{uuid.uuid4().hex[:6]}",
    )
    web = free_port()
    daphne = GatewayProcess(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(web), "config.asgi:application"],
        env,
        name="daphne",
    ).start()
    bridge = GatewayProcess(manage("runbridge"), env, name="runbridge").start()
    try:
        wait_for(
            lambda: http_ok(f"http://127.0.0.1:{web}/readyz") or not daphne.alive(),
            timeout=30,
            what="/readyz",
        )
        assert daphne.alive() and bridge.alive(), daphne.log() + bridge.log()
        publish(f"{prefix}/r-1/status", b"online")
        user = get_user_model().objects.create_superuser(username="redis-op", password="x")
        with connect(f"ws://127.0.0.1:{web}/ws/?token={services.issue_token(user=user)}") as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"
            ws.send(json.dumps({"op": "subscribe", "devices": "*"}))
            assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
            publish(f"{prefix}/r-1/telemetry", b'{"v": 1}')
            assert next_telemetry(ws, 10)["values"] == {"v": 1}
            # redis-py 8 times out idle sockets after 5 s by default; the hub must survive an idle spell.
            time.sleep(6.5)
            publish(f"{prefix}/r-1/telemetry", b'{"v": 2}')
            assert next_telemetry(ws, 10)["values"] == {"v": 2}, daphne.log()
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=5) as response:
            exposition = response.read().decode()
        assert "\ngateway_hub_layer_errors_total 0.0\n" in exposition, "the hub's layer receive must not fail"
    finally:
        bridge.kill(signal.SIGTERM)
        daphne.kill(signal.SIGTERM)
    assert "Traceback" not in daphne.log() + bridge.log(), daphne.log() + bridge.log()
