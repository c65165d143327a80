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
from tests.support import GatewayProcess, PahoDevice, gateway_env, manage, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def start_bridge(port: int, prefix: str, name: str, **extra_env: str) -> GatewayProcess:
    env = gateway_env(
        **extra_env,
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


def operator_command(*, timeout: float = 30, request_id: str = "r") -> str:
    from django.contrib.auth import get_user_model

    from devices import services
    from devices.models import Device
    from devices.permissions import access_for

    Device.objects.get_or_create(id="dev-c", defaults={"online": True})
    user, _ = get_user_model().objects.get_or_create(username="op", defaults={"is_superuser": True})
    outcome = services.request_command(
        user=user,
        access=access_for(user),
        device_id="dev-c",
        name="reboot",
        params={"n": 1},
        request_id=request_id,
        timeout=timeout,
        offline_policy="reject",
        max_payload=65536,
    )
    return outcome.command.id


def command_state(command_id: str) -> str:
    from devices.models import Command

    return Command.objects.get(id=command_id).state


def test_a_command_stored_while_the_bridge_is_down_reaches_the_device_after_restart(private_mosquitto, prefix):
    name = f"cmd-{uuid.uuid4().hex[:6]}"
    start_bridge(private_mosquitto.port, prefix, name).kill(signal.SIGKILL)
    device = PahoDevice(private_mosquitto.port, prefix, "dev-c").start()
    command_id = operator_command()
    assert command_state(command_id) == "pending"
    bridge = start_bridge(private_mosquitto.port, prefix, name)
    try:
        wait_for(lambda: command_state(command_id) == "succeeded", timeout=15, what="the command to succeed")
        assert [p["id"] for p in device.received] == [command_id]
    finally:
        bridge.kill(signal.SIGTERM)
        device.stop()


def test_a_bridge_killed_after_publishing_leaves_no_command_without_a_final_state(private_mosquitto, prefix):
    name = f"cmd-{uuid.uuid4().hex[:6]}"
    device = PahoDevice(private_mosquitto.port, prefix, "dev-c", answer=False).start()
    bridge = start_bridge(private_mosquitto.port, prefix, name, GATEWAY_COMMAND_LEASE="1")
    command_id = operator_command(timeout=2)
    wait_for(lambda: command_state(command_id) == "sent", timeout=10, what="the command to be sent")
    bridge.kill(signal.SIGKILL)
    bridge = start_bridge(private_mosquitto.port, prefix, name, GATEWAY_COMMAND_LEASE="1")
    try:
        wait_for(lambda: command_state(command_id) == "expired", timeout=15, what="the orphan to expire")
        assert len(device.received) == 1
    finally:
        bridge.kill(signal.SIGTERM)
        device.stop()
