"""The scale-out topology for real on one machine (issue 4): two Daphne processes and two ``runbridge`` processes in
one MQTT shared group, joined by Redis, on a fresh PostgreSQL database and the machine's Mosquitto.

10,000 telemetry messages from 200 devices, published at 1,000 per second or more, reach a WebSocket client on each
Daphne exactly once, with the same ids as the database; both bridges store a share; ids become visible in id order
in the database while both write; a command sent through Daphne A is published once, answered, and its states are
seen on Daphne B.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import psycopg
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_bridge.simulator import SimulatedDevice, SimulatorConfig
from mqtt_bridge.topics import Channel, Topics
from tests.faults.harness import (
    bridge_metric,
    descents,
    fresh_database,
    operator_token,
    stored_event_ids,
    watching,
)
from tests.support import (
    MQTT_HOST,
    MQTT_PORT,
    GatewayProcess,
    free_port,
    gateway_env,
    http_ok,
    manage,
    require_mosquitto,
    require_postgres,
    require_redis,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.mosquitto, pytest.mark.postgres]

DEVICES = 200
PER_DEVICE = 50
TOTAL = DEVICES * PER_DEVICE
TARGET_RATE = 1300.0  # messages per second the flood is paced at; the issue asks for at least 1,000
FLOOD_CONNECTIONS = 4  # devices are spread over a few MQTT connections (the device id is in the topic)
COMMAND_STATES = ["pending", "sent", "succeeded"]


# --- the database -----------------------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    """Mosquitto and Redis are there (checked before a database is made for nothing); the layer's Redis, emptied."""
    require_mosquitto()
    url = require_redis()
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def topology_database() -> Iterator[str]:
    """A fresh PostgreSQL database (whatever the suite's own database is), migrated; its DATABASE_URL."""
    with fresh_database(require_postgres()) as url:
        yield url


@contextlib.contextmanager
def watching_id_order(database_url: str) -> Iterator[IdOrderWatch]:
    watch = IdOrderWatch(database_url)
    watch.start()
    try:
        yield watch
    finally:
        watch.stop()


class IdOrderWatch(threading.Thread):
    """A concurrent reader: once it has seen ids up to N, no id at or below N may appear later (ids become visible
    in id order with several writers, architecture section 5). One count per poll keeps it cheap."""

    def __init__(self, database_url: str) -> None:
        super().__init__(name="id-order-watch", daemon=True)
        self._url = database_url
        self._halt = threading.Event()
        self.polls = 0
        self.violations: list[str] = []

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:
            self.violations.append(f"the watch failed: {exc!r}")

    def _watch(self) -> None:
        seen_max, seen_count = 0, 0
        query = "SELECT count(*) FILTER (WHERE id <= %s), count(*), coalesce(max(id), 0) FROM devices_event"
        with psycopg.connect(self._url, autocommit=True) as conn:
            while not self._halt.wait(0.02):
                row = conn.execute(query, [seen_max]).fetchone()
                assert row is not None
                at_or_below, count, newest = row
                if at_or_below != seen_count:
                    self.violations.append(f"{at_or_below - seen_count} id(s) <= {seen_max} appeared after it")
                seen_max, seen_count = newest, count
                self.polls += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# --- the processes ----------------------------------------------------------------------------------------------


@dataclass
class Topology:
    """Two Daphne processes and two bridges in one shared group; every process on the same database and Redis."""

    database_url: str
    redis_url: str
    prefix: str
    run: str
    web_ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    metrics_ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    processes: list[GatewayProcess] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return gateway_env(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            MQTT_URL=f"mqtt://{MQTT_HOST}:{MQTT_PORT}",
            MQTT_PROTOCOL="5",
            GATEWAY_TOPIC_PREFIX=self.prefix,
            GATEWAY_MQTT_SHARED_GROUP=f"topology-{self.run}",
            GATEWAY_MQTT_SESSION_EXPIRY="60",
            **extra,
        )

    def start(self) -> None:
        for port in self.web_ports:
            daphne = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"]
            self.processes.append(GatewayProcess(daphne, self.env(), name="daphne").start())
        for number, port in enumerate(self.metrics_ports, 1):
            env = self.env(
                GATEWAY_MQTT_CLIENT_ID=f"topology-{self.run}-{number}", GATEWAY_METRICS_BIND=f"127.0.0.1:{port}"
            )
            self.processes.append(GatewayProcess(manage("runbridge"), env, name="runbridge").start())

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert all(process.alive() for process in self.processes), self.logs()
            return all(http_ok(f"http://127.0.0.1:{port}/readyz") for port in self.web_ports) and all(
                bridge_metric(port, "gateway_mqtt_connected") == 1 for port in self.metrics_ports
            )

        wait_for(ready, timeout=30, interval=0.2, what="both Daphnes ready and both bridges connected")

    def stop(self) -> None:
        for process in self.processes:
            process.kill(signal.SIGTERM)

    def logs(self) -> str:
        return "\n".join(f"--- {process.name} {process.args[-1]}\n{process.log()}" for process in self.processes)


# --- the devices ------------------------------------------------------------------------------------------------


class Flood(threading.Thread):
    """DEVICES devices publishing PER_DEVICE telemetry messages each (``seq`` 1..PER_DEVICE), QoS 1, paced at
    TARGET_RATE over FLOOD_CONNECTIONS connections; ``rate`` is what was achieved, up to the last PUBACK."""

    def __init__(self, prefix: str, device_ids: list[str]) -> None:
        super().__init__(name="flood", daemon=True)
        self._topics = Topics(prefix)
        self._device_ids = device_ids
        self.sent = 0
        self.started_at = 0.0
        self.rate = 0.0
        self.last_publish_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        clients = [self._client() for _ in range(FLOOD_CONNECTIONS)]
        try:
            self._publish_all(clients)
        except BaseException as exc:
            self.error = exc
        finally:
            for client in clients:
                client.disconnect()
                client.loop_stop()

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"topology-flood-{uuid.uuid4().hex[:8]}")
        client.max_inflight_messages_set(200)
        client.connect(MQTT_HOST, MQTT_PORT)
        client.loop_start()
        return client

    def _publish_all(self, clients: list[mqtt.Client]) -> None:
        infos = []
        self.started_at = time.monotonic()
        for seq in range(1, PER_DEVICE + 1):
            for number, device_id in enumerate(self._device_ids):
                due = self.started_at + self.sent / TARGET_RATE
                if self.sent % 20 == 0 and due > time.monotonic():
                    time.sleep(due - time.monotonic())
                topic = self._topics.device(device_id, Channel.TELEMETRY)
                info = clients[number % FLOOD_CONNECTIONS].publish(topic, f'{{"seq":{seq},"v":{seq}}}', qos=1)
                assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish {device_id} seq {seq}: {mqtt.error_string(info.rc)}"
                infos.append(info)
                self.sent += 1
        self.last_publish_at = time.monotonic()
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published(), f"message {info.mid} not acknowledged by the broker within 30 s"
        self.rate = TOTAL / (time.monotonic() - self.started_at)


@contextlib.contextmanager
def command_device(prefix: str, device_id: str) -> Iterator[SimulatedDevice]:
    """The bundled simulator's device (retained ``online``, answers each command id once after 0.3 s)."""
    config = SimulatorConfig(host=MQTT_HOST, port=MQTT_PORT, prefix=prefix, protocol="5", reply_delay=0.3)
    device = SimulatedDevice(config, Topics(prefix), device_id, random.Random(1))
    device.connect()
    try:
        assert device.subscribed.wait(10), f"{device_id} did not subscribe to its commands"
        yield device
    finally:
        device.disconnect()


def clear_retained(topic: str) -> None:
    """Leave the machine's Mosquitto (which persists retained messages) as it was."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"topology-clean-{uuid.uuid4().hex[:8]}")
    client.connect(MQTT_HOST, MQTT_PORT)
    client.loop_start()
    client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


# --- the WebSocket clients --------------------------------------------------------------------------------------


# --- the test ---------------------------------------------------------------------------------------------------


def test_two_daphnes_and_two_bridges_deliver_every_message_once_to_each_client(redis_url, topology_database, capsys):
    run = uuid.uuid4().hex[:8]
    topology = Topology(topology_database, redis_url, prefix=f"topology-{run}/devices", run=run)
    device_ids = [f"t{run}-{number:03d}" for number in range(DEVICES)]
    commanded = device_ids[0]
    with contextlib.ExitStack() as stack:
        stack.callback(clear_retained, Topics(topology.prefix).device(commanded, Channel.STATUS))
        stack.callback(topology.stop)
        topology.start()
        token = operator_token(topology_database)
        topology.wait_ready()
        a, b = (stack.enter_context(watching(port, token, TOTAL)) for port in topology.web_ports)
        device = stack.enter_context(command_device(topology.prefix, commanded))
        wait_for(lambda: commanded in a.online, timeout=10, what=f"{commanded} online on Daphne A")
        watch = stack.enter_context(watching_id_order(topology_database))

        flood = Flood(topology.prefix, device_ids)
        flood.start()
        wait_for(lambda: flood.sent >= TOTAL // 2 or not flood.is_alive(), timeout=30, what="half of the flood")
        command_sent_at = time.monotonic()
        a.ws.send(json.dumps({"op": "command", "device": commanded, "name": "reboot", "params": {"n": 1}}))
        flood.join(60)
        assert flood.error is None, f"the flood failed: {flood.error!r}"
        assert flood.rate >= 1000, f"published at {flood.rate:.0f} msg/s, below 1,000"

        try:
            wait_for(lambda: a.complete_at and b.complete_at, timeout=30, interval=0.1, what="everything on A and B")
            command_id = wait_for(a.first_command_id, timeout=10, what="the command's frames on A")
            wait_for(lambda: b.state_of(command_id) == "succeeded", timeout=15, what="the reply on B")
            wait_for(
                lambda: set(a.received_ids()) == set(b.received_ids()) == stored_event_ids(topology_database),
                timeout=10,
                what="the same ids on A, on B and in the database",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}: A has {len(a.telemetry)}, B {len(b.telemetry)}\n{topology.logs()}") from None
        watch.stop()
        shares = [
            bridge_metric(port, "gateway_events_stored_total", kind="telemetry") for port in topology.metrics_ports
        ]

        expected = {(device_id, seq) for device_id in device_ids for seq in range(1, PER_DEVICE + 1)}
        a.check("A", expected)
        b.check("B", expected)
        states = b.command_states(command_id)
        assert [state for state, _ in states] == COMMAND_STATES, f"command states seen on B: {states}"
        assert (device.replied, device.ignored) == (1, 0), "exactly one publish of the command reaches the device"
        assert all(share for share in shares), f"both bridges store a share (telemetry stored per bridge): {shares}"
        assert sum(share or 0 for share in shares) == TOTAL, f"each message stored once: {shares}"
        assert watch.violations == [], f"ids became visible out of id order: {watch.violations[:5]}"
        # Batches of two bridges (and the web side's command events) overtake one another in the layer; each hub
        # catches the overtaken ids up from the database, so every client sees ids in strictly increasing order.
        assert (descents(a.received_ids()), descents(b.received_ids())) == (0, 0), "ids out of order on A/B"
        assert watch.polls > 10, f"the id order was read only {watch.polls} times"

    complete_at = max(a.complete_at, b.complete_at)
    with capsys.disabled():
        print(
            f"\ntopology: {TOTAL} messages from {DEVICES} devices published at {flood.rate:.0f} msg/s "
            f"(paced at {TARGET_RATE:.0f}); both clients had all of them "
            f"{complete_at - flood.started_at:.1f} s after the first publish, "
            f"{(complete_at - flood.last_publish_at) * 1000:.0f} ms after the last; "
            f"telemetry stored per bridge {[int(share or 0) for share in shares]}; "
            f"command succeeded on B {states[-1][1] - command_sent_at:.2f} s after it was sent through A "
            f"(device answers after 0.3 s); ids in strictly increasing order on both clients; "
            f"id order in the database checked in {watch.polls} polls"
        )
