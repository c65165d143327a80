"""Several bridges in one shared group on a real Mosquitto: exactly one records presence (and hands the role on),
and a bridge retired with ``runbridge --retire`` leaves nothing stranded in its session."""

from __future__ import annotations

import asyncio
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer
from paho.mqtt.enums import CallbackAPIVersion

from devices.models import Device, Event, Lease
from mqtt_bridge.bridge import STATUS_ROLE, Bridge, BridgeSettings
from mqtt_bridge.client import MqttClient, MqttConfig
from tests.support import GatewayProcess, gateway_env, manage, require_mosquitto, wait_for

pytestmark = [pytest.mark.mosquitto, pytest.mark.django_db(transaction=True)]


def shared_bridge(port: int, prefix: str, group: str, name: str) -> Bridge:
    config = MqttConfig(host="127.0.0.1", port=port, client_id=name, protocol="5", session_expiry=120)
    return Bridge(
        client_factory=lambda: MqttClient(config),
        channel_layer=InMemoryChannelLayer(),
        settings=BridgeSettings(
            name=name,
            topic_prefix=prefix,
            shared_group=group,
            heartbeat_interval=0.2,
            backoff_initial=0.1,
            backoff_cap=0.5,
        ),
    )


def device_client(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish(client: mqtt.Client, items: list[tuple[str, str]], *, retain: bool = False) -> None:
    infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload in items]
    for info in infos:
        info.wait_for_publish(10)


@sync_to_async
def status_history(device_id: str) -> list[bool]:
    return [
        body["online"]
        for body in Event.objects.filter(device_id=device_id, kind="status").values_list("body", flat=True)
    ]


@sync_to_async
def presence(device_id: str) -> bool | None:
    found = Device.objects.filter(id=device_id).first()
    return None if found is None else found.online


async def eventually(predicate, *, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while True:
                if await predicate():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def test_one_bridge_records_presence_and_hands_the_role_on():
    _, port = require_mosquitto()
    prefix, group = f"t{uuid.uuid4().hex[:10]}/devices", f"g{uuid.uuid4().hex[:8]}"
    first = shared_bridge(port, prefix, group, f"first-{uuid.uuid4().hex[:6]}")
    second = shared_bridge(port, prefix, group, f"second-{uuid.uuid4().hex[:6]}")
    tasks = [asyncio.create_task(first.run())]
    device = await asyncio.to_thread(device_client, port)
    topic = f"{prefix}/flappy/status"
    try:
        await asyncio.wait_for(first.wait_connected(), 10)
        tasks.append(asyncio.create_task(second.run()))
        await asyncio.wait_for(second.wait_connected(), 10)
        assert first.status_role.held and not second.status_role.held

        # A device flapping fast: every transition recorded once, in order, and the presence ends right.
        flaps = [("online" if i % 2 == 0 else "offline") for i in range(21)]
        await asyncio.to_thread(publish, device, [(topic, state) for state in flaps], retain=True)
        expected = [state == "online" for state in flaps]

        async def all_recorded() -> bool:
            return await status_history("flappy") == expected

        await eventually(all_recorded, timeout=10, what="21 transitions")
        assert await presence("flappy") is True

        # The holder stops: the other takes the role, receives the retained status, and records what follows.
        first.stop()
        await asyncio.wait_for(tasks[0], 10)
        await sync_to_async(Device.objects.filter(id="flappy").update)(online=False)  # drift the stored state

        async def corrected() -> bool:
            return second.status_role.held and await presence("flappy") is True

        await eventually(corrected, timeout=5, what="the second bridge to take the role and the retained status")
        holder = await sync_to_async(lambda: Lease.objects.get(name=STATUS_ROLE).owner)()
        assert holder == second.settings.name
        await asyncio.to_thread(publish, device, [(topic, "offline")], retain=True)

        async def offline_recorded() -> bool:
            return (await status_history("flappy"))[-1] is False and await presence("flappy") is False

        await eventually(offline_recorded, timeout=5, what="the next transition")
        assert len(await status_history("flappy")) == len(expected) + 2  # + the correction, + offline
    finally:
        await asyncio.to_thread(publish, device, [(topic, "")], retain=True)  # leave nothing retained
        device.loop_stop()
        for bridge in (first, second):
            bridge.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def session_present(port: int, client_id: str) -> bool:
    """Whether the broker still keeps a session for ``client_id`` (connects without a clean start, then leaves)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    found: dict[str, bool] = {}
    connected = threading.Event()

    def on_connect(c, userdata, flags, reason, properties):
        found["present"] = bool(flags.session_present)
        connected.set()

    client.on_connect = on_connect
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0  # do not leave a session of our own behind
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    client.loop_start()
    assert connected.wait(5)
    client.disconnect()
    client.loop_stop()
    return found["present"]


@pytest.mark.slow
async def test_retire_stores_what_was_queued_for_a_stopped_member_and_ends_its_session():
    _, port = require_mosquitto()
    prefix, group = f"t{uuid.uuid4().hex[:10]}/devices", f"g{uuid.uuid4().hex[:8]}"
    staying = shared_bridge(port, prefix, group, f"staying-{uuid.uuid4().hex[:6]}")
    leaving = shared_bridge(port, prefix, group, f"leaving-{uuid.uuid4().hex[:6]}")
    tasks = [asyncio.create_task(staying.run()), asyncio.create_task(leaving.run())]
    device = await asyncio.to_thread(device_client, port)
    try:
        await asyncio.wait_for(asyncio.gather(staying.wait_connected(), leaving.wait_connected()), 10)
        leaving.stop()  # stopped, not retired: its persistent session stays in the group
        await asyncio.wait_for(tasks[1], 10)

        count = 300
        items = [(f"{prefix}/d{seq % 10}/telemetry", f'{{"seq": {seq}, "v": {seq}}}') for seq in range(1, count + 1)]
        await asyncio.to_thread(publish, device, items)
        await asyncio.sleep(1.0)
        stranded = count - await sync_to_async(Event.objects.filter(kind="telemetry").count)()
        assert stranded > 0, (
            "the broker gave the stopped member no share: nothing to retire (broker behaviour changed?)"
        )

        env = gateway_env(
            MQTT_URL=f"mqtt://127.0.0.1:{port}",
            GATEWAY_TOPIC_PREFIX=prefix,
            GATEWAY_MQTT_SHARED_GROUP=group,
            GATEWAY_MQTT_CLIENT_ID=leaving.settings.name,
            GATEWAY_MQTT_SESSION_EXPIRY="120",
        )
        retire = GatewayProcess(manage("runbridge", "--retire", "--idle", "1"), env, name="retire").start()
        assert retire.process is not None
        assert await asyncio.to_thread(retire.process.wait, 30) == 0, retire.log()
        assert f"stored {stranded} queued message(s)" in retire.log(), retire.log()

        stored = await sync_to_async(
            lambda: sorted(seq or 0 for seq in Event.objects.filter(kind="telemetry").values_list("seq", flat=True))
        )()
        assert stored == list(range(1, count + 1))  # everything, once
        assert not await asyncio.to_thread(session_present, port, leaving.settings.name)

        # After retiring, the remaining member takes the whole load.
        await asyncio.to_thread(publish, device, [(f"{prefix}/d1/telemetry", '{"seq": 1000, "v": 1}')])
        await asyncio.to_thread(
            wait_for,
            lambda: Event.objects.filter(seq=1000).exists(),
            timeout=5,
            what="the next message at the remaining bridge",
        )
    finally:
        device.loop_stop()
        staying.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
