"""Simulated devices answer commands over the machine's Mosquitto: once per id, never a retained one."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_bridge.simulator import Simulator, SimulatorConfig
from mqtt_bridge.topics import Channel, Topics
from tests.support import require_mosquitto

pytestmark = pytest.mark.mosquitto


class Operator:
    """The gateway's side, played by a plain paho client: publishes commands, collects replies."""

    def __init__(self, host: str, port: int, replies_topic: str, protocol: MQTTProtocolVersion = mqtt.MQTTv311) -> None:
        self.replies: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"op-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        self.client.on_message = lambda client, userdata, message: self.replies.put(message)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda client, userdata, mid, reasons, properties: subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        assert self.client.subscribe(replies_topic, qos=1)[0] == mqtt.MQTT_ERR_SUCCESS
        assert subscribed.wait(5), "no SUBACK for the replies topic"

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, properties: Properties | None = None
    ) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        info.wait_for_publish(5)
        assert info.is_published()

    def reply(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return self.replies.get(timeout=timeout)

    def no_more_replies(self, within: float = 0.5) -> bool:
        try:
            self.replies.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def command(command_id: str, params: dict | None = None) -> bytes:
    now = time.time()
    return orjson.dumps({"id": command_id, "params": params or {}, "ts": now, "expires": now + 30, "ttl": 30})


def make_simulator(prefix: str, *, protocol: str = "3.1.1", **options) -> Simulator:
    host, port = require_mosquitto()
    config = SimulatorConfig(
        host=host,
        port=port,
        prefix=prefix,
        devices=1,
        rate=0,  # no telemetry: only command replies
        id_prefix=f"s{uuid.uuid4().hex[:8]}-",
        protocol=protocol,
        **options,
    )
    return Simulator(config)


@contextmanager
def running(simulator: Simulator) -> Iterator[tuple[Simulator, Topics, str]]:
    topics = Topics(simulator.config.prefix)
    device_id = simulator.devices[0].state.device_id
    simulator.start()
    try:
        assert simulator.wait_ready(10), "the simulated device did not subscribe to its commands"
        yield simulator, topics, device_id
    finally:
        simulator.stop()
        # Leave nothing retained on the shared broker.
        cleaner = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"clean-{uuid.uuid4().hex[:8]}")
        cleaner.connect(simulator.config.host, simulator.config.port)
        cleaner.loop_start()
        cleaner.publish(topics.device(device_id, Channel.STATUS), b"", qos=1, retain=True).wait_for_publish(5)
        cleaner.disconnect()
        cleaner.loop_stop()


def simulation(prefix: str, **options):
    return running(make_simulator(prefix, **options))


@pytest.fixture
def operator_for():
    made: list[Operator] = []

    def make(replies_topic: str, protocol: MQTTProtocolVersion = mqtt.MQTTv311) -> Operator:
        host, port = require_mosquitto()
        made.append(Operator(host, port, replies_topic, protocol))
        return made[-1]

    yield make
    for operator in made:
        operator.close()


def test_a_device_answers_a_command_with_its_params(prefix, operator_for):
    with simulation(prefix, reply_delay=0.05) as (simulator, topics, device_id):
        operator = operator_for(topics.device(device_id, Channel.REPLIES))
        operator.publish(topics.command(device_id, "reboot"), command("c-1", {"delay": 5}))
        reply = operator.reply()
        assert orjson.loads(reply.payload) == {"id": "c-1", "ok": True, "result": {"echo": {"delay": 5}}}
        assert reply.topic == topics.device(device_id, Channel.REPLIES)
        assert simulator.replied == 1


def test_a_failure_rate_of_one_answers_every_command_with_a_failure(prefix, operator_for):
    with simulation(prefix, reply_failure_rate=1.0) as (_, topics, device_id):
        operator = operator_for(topics.device(device_id, Channel.REPLIES))
        for n in range(3):
            operator.publish(topics.command(device_id, "reboot"), command(f"c-{n}"))
        replies = sorted((orjson.loads(operator.reply().payload) for _ in range(3)), key=lambda r: r["id"])
        assert replies == [{"id": f"c-{n}", "ok": False, "error": "simulated failure"} for n in range(3)]


def test_a_retained_command_is_never_executed(prefix, operator_for):
    simulator = make_simulator(prefix)
    topics = Topics(prefix)
    device_id = simulator.devices[0].state.device_id
    stale_topic = topics.command(device_id, "reboot")
    operator = operator_for(topics.device(device_id, Channel.REPLIES))
    # Retained before the device connects: the broker hands it over (flagged retained) when the device subscribes.
    operator.publish(stale_topic, command("stale"), retain=True)
    try:
        with running(simulator):
            operator.publish(stale_topic, command("fresh"))
            assert orjson.loads(operator.reply().payload)["id"] == "fresh"
            assert operator.no_more_replies()
            assert simulator.devices[0].ignored == 1 and simulator.replied == 1
    finally:
        operator.publish(stale_topic, b"", retain=True)  # clear it from the shared broker


def test_the_same_command_id_twice_is_answered_once(prefix, operator_for):
    with simulation(prefix, reply_delay=0.05) as (simulator, topics, device_id):
        operator = operator_for(topics.device(device_id, Channel.REPLIES))
        operator.publish(topics.command(device_id, "reboot"), command("dup"))
        operator.publish(topics.command(device_id, "reboot"), command("dup"))
        operator.publish(topics.command(device_id, "other"), command("next"))
        ids = sorted(orjson.loads(operator.reply().payload)["id"] for _ in range(2))
        assert ids == ["dup", "next"]
        assert operator.no_more_replies()
        assert simulator.replied == 2 and simulator.devices[0].ignored == 1


def test_a_malformed_command_is_ignored_and_the_device_keeps_answering(prefix, operator_for):
    with simulation(prefix, reply_delay=0) as (simulator, topics, device_id):
        operator = operator_for(topics.device(device_id, Channel.REPLIES))
        for payload in (b"{not json", b"[1]", b'{"id": 5}', b'{"params": {}}'):
            operator.publish(topics.command(device_id, "reboot"), payload)
        operator.publish(topics.command(device_id, "reboot"), command("ok-after"))
        assert orjson.loads(operator.reply().payload)["id"] == "ok-after"
        assert operator.no_more_replies(0.3)
        assert simulator.devices[0].ignored == 4


def test_on_mqtt_5_the_reply_carries_the_correlation_data(prefix, operator_for):
    with simulation(prefix, protocol="5") as (_, topics, device_id):
        replies_topic = topics.device(device_id, Channel.REPLIES)
        operator = operator_for(replies_topic, mqtt.MQTTv5)
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = replies_topic
        properties.CorrelationData = b"c-5"
        operator.publish(topics.command(device_id, "reboot"), command("c-5"), properties=properties)
        reply = operator.reply()
        assert orjson.loads(reply.payload)["ok"] is True
        assert reply.properties.CorrelationData == b"c-5"
