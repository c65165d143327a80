"""``runbridge`` as a real process on a private Mosquitto: stop it, publish, start it again; and SIGKILL it
mid-stream. Acknowledgement after storage plus a persistent session means nothing is lost; ``seq`` means
nothing is stored twice."""

from __future__ import annotations

import signal
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.models import BridgeHeartbeat, Event
from tests.support import GatewayProcess, gateway_env, manage, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def start_bridge(port: int, prefix: str, name: str) -> GatewayProcess:
    env = gateway_env(
        MQTT_URL=f"mqtt://127.0.0.1:{port}",
        GATEWAY_TOPIC_PREFIX=prefix,
        GATEWAY_MQTT_CLIENT_ID=name,
        GATEWAY_BATCH_MAX="200",
    )
    process = GatewayProcess(manage("runbridge"), env, name="runbridge").start()
    try:
        wait_for(
            lambda: BridgeHeartbeat.objects.filter(name=name, connected=True).exists() or not process.alive(),
            timeout=20,
            what="the bridge to connect",
        )
        assert process.alive(), process.log()
    except BaseException:
        process.kill()
        raise
    BridgeHeartbeat.objects.filter(name=name).delete()
    return process


def publish(port: int, prefix: str, count: int, start_seq: int = 1) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    for seq in range(start_seq, start_seq + count):
        device = f"dev-{seq % 7}"
        info = client.publish(f"{prefix}/{device}/telemetry", f'{{"seq": {seq}, "v": {seq}}}', qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        infos.append(info)
    for info in infos:
        info.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


def stored_seqs() -> list[int]:
    return [seq for seq in Event.objects.filter(kind="telemetry").values_list("seq", flat=True) if seq is not None]


def test_messages_published_while_the_bridge_is_stopped_arrive_once(private_mosquitto, prefix):
    name = f"restart-{uuid.uuid4().hex[:6]}"
    bridge = start_bridge(private_mosquitto.port, prefix, name)
    publish(private_mosquitto.port, prefix, 50)
    try:
        wait_for(lambda: len(stored_seqs()) >= 50, timeout=30, what="50 events")
    except AssertionError:
        raise AssertionError(
            f"stored {sorted(stored_seqs())}; all: {list(Event.objects.values_list('kind', 'seq'))}\n{bridge.log()}"
        ) from None
    assert bridge.kill(signal.SIGTERM) == 0, bridge.log()
    publish(private_mosquitto.port, prefix, 300, start_seq=51)  # queued by the broker for the persistent session
    assert len(stored_seqs()) == 50
    bridge = start_bridge(private_mosquitto.port, prefix, name)
    try:
        wait_for(lambda: len(stored_seqs()) >= 350, timeout=20, what="the queued messages", interval=0.2)
        threading.Event().wait(1.0)
        seqs = stored_seqs()
        assert sorted(seqs) == list(range(1, 351)), "every message once, none twice"
    finally:
        bridge.kill(signal.SIGTERM)


def test_sigkill_in_the_middle_of_ingest_loses_nothing_and_duplicates_nothing(private_mosquitto, prefix):
    name = f"kill-{uuid.uuid4().hex[:6]}"
    total = 4000
    bridge = start_bridge(private_mosquitto.port, prefix, name)
    sender = threading.Thread(target=publish, args=(private_mosquitto.port, prefix, total))
    sender.start()
    wait_for(lambda: len(stored_seqs()) >= 400, timeout=20, what="ingest under way", interval=0.01)
    bridge.kill(signal.SIGKILL)
    at_kill = len(stored_seqs())
    sender.join(60)
    assert at_kill < total, "the kill should land while messages are still flowing"
    bridge = start_bridge(private_mosquitto.port, prefix, name)
    try:
        wait_for(lambda: len(stored_seqs()) >= total, timeout=30, what=f"{total} events", interval=0.2)
        threading.Event().wait(1.0)
        assert sorted(stored_seqs()) == list(range(1, total + 1))
    finally:
        bridge.kill(signal.SIGTERM)
