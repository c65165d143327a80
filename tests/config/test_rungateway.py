"""The one-command default for real: ``rungateway`` (Daphne + bridge + embedded broker + demo) and a
WebSocket client against it, over real sockets."""

from __future__ import annotations

import json
import signal
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from django.contrib.auth import get_user_model
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
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
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def token() -> str:
    user = get_user_model().objects.create_superuser(username=f"op-{uuid.uuid4().hex[:6]}", password="x")
    return services.issue_token(user=user)


def start(*args: str, **env: str) -> tuple[GatewayProcess, int]:
    web = free_port()
    process = GatewayProcess(manage("rungateway", "--bind", f"127.0.0.1:{web}", *args), gateway_env(**env)).start()
    wait_for(lambda: http_ok(f"http://127.0.0.1:{web}/healthz") or not process.alive(), timeout=30, what="/healthz")
    assert process.alive(), process.log()
    return process, web


def events_until(ws, predicate, timeout: float = 10.0) -> list[dict]:
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        for event in frame["events"] if frame["type"] == "batch" else [frame]:
            seen.append(event)
            if predicate(event):
                return seen
    raise AssertionError(f"no matching event within {timeout} s; saw {seen[-5:]}")


def publish(port: int, topic: str, payload: bytes, protocol: MQTTProtocolVersion) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}", protocol=protocol)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_one_command_with_the_embedded_broker_and_demo_devices():
    broker_port = free_port()
    process, web = start(
        "--embedded-broker",
        "--demo",
        "3",
        "--demo-rate",
        "5",
        MQTT_URL=f"mqtt://127.0.0.1:{broker_port}",
        GATEWAY_MQTT_CLIENT_ID=f"rg-{uuid.uuid4().hex[:6]}",
    )
    try:
        wait_for(lambda: "Gateway console: http://localhost:" in process.log(), timeout=10, what="the console URL")
        assert "starting the embedded broker" in process.log()
        wait_for(lambda: http_ok(f"http://127.0.0.1:{web}/readyz"), timeout=15, what="/readyz")
        with connect(f"ws://127.0.0.1:{web}/ws/?token={token()}") as ws:
            hello = json.loads(ws.recv(timeout=5))
            assert hello["type"] == "hello"
            ws.send(json.dumps({"op": "subscribe", "devices": "*", "after": hello["last_id"]}))
            assert json.loads(ws.recv(timeout=5)) == {"type": "subscribed", "devices": "*"}
            demo = events_until(ws, lambda e: e["device"].startswith("demo-") and e["type"] == "telemetry")
            assert demo[-1]["values"]["temp"] is not None
            publish(broker_port, "devices/probe-1/telemetry", b'{"probe": 42}', mqtt.MQTTv311)
            mine = events_until(ws, lambda e: e["device"] == "probe-1")
            assert mine[-1]["values"] == {"probe": 42}
    finally:
        code = process.kill(signal.SIGTERM)
    assert code == 0, process.log()


@pytest.mark.mosquitto
def test_embedded_broker_flag_uses_a_broker_that_already_answers():
    require_mosquitto()
    prefix = f"t{uuid.uuid4().hex[:8]}/devices"
    process, web = start(
        "--embedded-broker",
        MQTT_URL=f"mqtt://127.0.0.1:{MQTT_PORT}",
        GATEWAY_TOPIC_PREFIX=prefix,
        GATEWAY_MQTT_CLIENT_ID=f"rg-{uuid.uuid4().hex[:6]}",
    )
    try:
        wait_for(lambda: "already answers" in process.log(), timeout=10, what="the one-line notice")
        wait_for(lambda: http_ok(f"http://127.0.0.1:{web}/readyz"), timeout=15, what="/readyz")
        with connect(f"ws://127.0.0.1:{web}/ws/?token={token()}") as ws:
            json.loads(ws.recv(timeout=5))
            publish(MQTT_PORT, f"{prefix}/m-1/status", b"online", mqtt.MQTTv5)
            wait_for(lambda: ws_subscribe_and_check(ws, "m-1"), timeout=10, what="m-1 registered")
            publish(MQTT_PORT, f"{prefix}/m-1/telemetry", b'{"t": 1.25}', mqtt.MQTTv5)
            seen = events_until(ws, lambda e: e["type"] == "telemetry")
            assert seen[-1]["values"] == {"t": 1.25} and seen[-1]["device"] == "m-1"
    finally:
        process.kill(signal.SIGTERM)


def ws_subscribe_and_check(ws, device: str) -> bool:
    ws.send(json.dumps({"op": "subscribe", "devices": [device]}))
    while True:
        frame = json.loads(ws.recv(timeout=5))
        if frame["type"] == "subscribed":
            return device in frame["devices"]


def test_a_broken_configuration_stops_start_up_with_one_clear_line():
    import subprocess

    result = subprocess.run(
        manage("rungateway"),
        env=gateway_env(MQTT_URL="http://nope"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == "configuration error: MQTT_URL='http://nope': scheme must be mqtt:// or mqtts://"
