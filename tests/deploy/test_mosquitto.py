"""deploy/mosquitto for real: the example configuration and ACL in a Mosquitto of the test's own (installed the way
Debian includes conf.d), with a throwaway CA and a password file. Devices publish only under their own id and
read only their own commands, over TLS; the bridge account uses the shared subscription and publishes commands;
nobody gets in without a password; and the real bridge, run as its unit runs it, stores a device's telemetry."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from devices.models import Event
from tests.deploy.helpers import DEPLOY, Tls, Units, require_binary, substitute
from tests.support import GatewayProcess, free_port, gateway_env, running, wait_for

pytestmark = [pytest.mark.slow]

PASSWORDS = {"dev-1": "pw-dev-1", "dev-2": "pw-dev-2", "gateway-bridge": "pw-bridge"}


@dataclass(frozen=True)
class Broker:
    tls_port: int
    local_port: int
    tls: Tls
    log: Path


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> Iterator[Broker]:
    mosquitto = require_binary("mosquitto", "mosquitto")
    directory = tmp_path_factory.mktemp("mosquitto")
    (directory / "conf.d").mkdir()
    (directory / "data").mkdir()
    (directory / "certs").mkdir()
    for source, target in ((tls.certificate, "server.crt"), (tls.key, "server.key")):
        (directory / "certs" / target).write_bytes(source.read_bytes())
    passwd = directory / "passwd"
    for user, password in PASSWORDS.items():
        create = ["-c"] if not passwd.exists() else []
        subprocess.run(
            [require_binary("mosquitto_passwd", "mosquitto"), *create, "-b", passwd, user, password], check=True
        )
    (directory / "acl").write_text((DEPLOY / "mosquitto" / "acl").read_text())
    tls_port, local_port = free_port(), free_port()
    (directory / "conf.d" / "gateway.conf").write_text(
        substitute(
            (DEPLOY / "mosquitto" / "gateway.conf").read_text(),
            {
                "listener 8883\n": f"listener {tls_port} 127.0.0.1\n",
                "listener 1883 127.0.0.1\n": f"listener {local_port} 127.0.0.1\n",
                "/etc/mosquitto/": f"{directory}/",
            },
        )
    )
    # Debian's /etc/mosquitto/mosquitto.conf, with this directory instead of /var/lib and /etc.
    main = directory / "mosquitto.conf"
    main.write_text(
        f"persistence true\npersistence_location {directory}/data/\nlog_dest stderr\n"
        + ("user root\n" if os.geteuid() == 0 else "")
        + f"include_dir {directory}/conf.d\n"
    )
    log = directory / "mosquitto.log"
    with log.open("wb") as output:
        process = subprocess.Popen([mosquitto, "-c", str(main)], stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: process.poll() is not None or (port_open(tls_port) and port_open(local_port)),
            timeout=10,
            what="mosquitto",
        )
        assert process.poll() is None, log.read_text()
        yield Broker(tls_port=tls_port, local_port=local_port, tls=tls, log=log)
    finally:
        process.terminate()
        process.wait(timeout=10)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Client:
    """A paho MQTT 5 client that records what it receives and the outcome of its connection and subscriptions."""

    def __init__(self, broker: Broker, user: str | None, *, over_tls: bool = True, password: str | None = None):
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{user or 'anonymous'}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
        )
        if user is not None:
            self.paho.username_pw_set(user, password or PASSWORDS[user])
        if over_tls:
            self.paho.tls_set(ca_certs=str(broker.tls.ca))
        self.paho.on_connect = lambda client, userdata, flags, code, properties: self.connack.put(code)
        self.paho.on_subscribe = lambda client, userdata, mid, codes, properties: self.subacks.put(codes)
        self.paho.on_message = lambda client, userdata, message: self.messages.put(message)
        self.paho.connect("127.0.0.1", broker.tls_port if over_tls else broker.local_port)
        self.paho.loop_start()

    def connected(self) -> bool:
        return not self.connack.get(timeout=5).is_failure

    def subscribe(self, topic: str) -> bool:
        self.paho.subscribe(topic, qos=1)
        return not self.subacks.get(timeout=5)[0].is_failure

    def publish(self, topic: str, payload: bytes) -> None:
        self.paho.publish(topic, payload, qos=1).wait_for_publish(5)

    def received(self) -> tuple[str, bytes]:
        message = self.messages.get(timeout=5)
        return message.topic, bytes(message.payload)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@contextlib.contextmanager
def clients(broker: Broker, *users: str, over_tls: bool = True) -> Iterator[list[Client]]:
    opened = [Client(broker, user, over_tls=over_tls and user != "gateway-bridge") for user in users]
    try:
        assert all(client.connected() for client in opened)
        yield opened
    finally:
        for client in opened:
            client.close()


def test_a_device_publishes_under_its_own_id_only(broker):
    with clients(broker, "gateway-bridge", "dev-1") as (bridge, device):
        assert bridge.subscribe("$share/gateway/devices/+/telemetry")
        device.publish("devices/dev-2/telemetry", b'{"forged": true}')  # refused by the ACL: never delivered
        device.publish("devices/dev-1/telemetry", b'{"v": 1}')
        assert bridge.received() == ("devices/dev-1/telemetry", b'{"v": 1}')
        assert bridge.messages.empty()


def test_a_device_reads_only_its_own_commands_which_the_bridge_publishes(broker):
    with clients(broker, "gateway-bridge", "dev-1", "dev-2") as (bridge, device, other):
        # Mosquitto 2.0 grants the subscription; the ACL is applied to each message it would deliver.
        other.subscribe("devices/dev-1/#")
        assert device.subscribe("devices/dev-1/commands/#")
        assert other.subscribe("devices/dev-2/commands/#")
        bridge.publish("devices/dev-1/commands/reboot", b'{"id": "c1"}')
        bridge.publish("devices/dev-2/commands/reboot", b'{"id": "c2"}')
        assert device.received() == ("devices/dev-1/commands/reboot", b'{"id": "c1"}')
        assert other.received() == ("devices/dev-2/commands/reboot", b'{"id": "c2"}')
        assert other.messages.empty() and device.messages.empty()


def test_the_bridge_account_reads_every_device_but_devices_publish_no_commands(broker):
    with clients(broker, "gateway-bridge", "dev-1") as (bridge, device):
        assert bridge.subscribe("devices/+/status")
        assert device.subscribe("devices/dev-1/commands/#")
        device.publish("devices/dev-1/commands/reboot", b"{}")  # not the device's to send
        device.publish("devices/dev-1/status", b"online")
        assert bridge.received() == ("devices/dev-1/status", b"online")
        assert device.messages.empty()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt3.1.1"])
def test_the_in_flight_window_holds_a_whole_batch(broker, protocol):
    """A bridge acknowledges nothing until its batch is stored: the broker must hand out at least GATEWAY_BATCH_MAX
    (500) unacknowledged messages. MQTT 5: the bridge's receive maximum (1,000); 3.1.1: max_inflight_messages."""
    received: list[int] = []
    bridge = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"window-{uuid.uuid4().hex[:6]}", protocol=protocol, manual_ack=True
    )
    bridge.username_pw_set("gateway-bridge", PASSWORDS["gateway-bridge"])
    subscribed = threading.Event()
    bridge.on_message = lambda client, userdata, message: received.append(message.mid)
    bridge.on_subscribe = lambda *args: subscribed.set()
    properties = None
    if protocol == mqtt.MQTTv5:
        properties = Properties(PacketTypes.CONNECT)
        properties.ReceiveMaximum = 1000
    bridge.connect("127.0.0.1", broker.local_port, properties=properties)
    bridge.loop_start()
    try:
        bridge.subscribe("devices/+/telemetry", qos=1)
        assert subscribed.wait(5)
        with clients(broker, "dev-1") as (device,):
            infos = [device.paho.publish("devices/dev-1/telemetry", b"{}", qos=1) for _ in range(1500)]
            for info in infos:
                info.wait_for_publish(10)
        wait_for(lambda: len(received) >= 1000, timeout=10, what="1,000 unacknowledged messages")
        time.sleep(0.3)  # and no more
    finally:
        bridge.loop_stop()
        bridge.disconnect()
    assert len(received) == 1000


def test_nobody_connects_without_the_right_password(broker):
    attempts = [  # anonymous, then a wrong password; on both listeners, all at once (refusals take a second)
        Client(broker, user, over_tls=over_tls, password=password)
        for over_tls in (True, False)
        for user, password in ((None, None), ("dev-1", "wrong"))
    ]
    try:
        assert [client.connected() for client in attempts] == [False] * 4
    finally:
        for client in attempts:
            client.close()


@pytest.mark.django_db(transaction=True)
def test_the_bridge_units_store_telemetry_and_retire_through_this_broker(broker, units: Units, tmp_path):
    """runbridge exactly as gateway-bridge@.service starts it (its ExecStart under its system-call sandbox), with
    the bridge account over TLS: READY=1 once connected, a device's telemetry stored. Then the scale-down: stopped,
    it is still assigned its share (queued in its session) until gateway-bridge-retire@ stores that and ends it."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    env = gateway_env(
        MQTT_URL=f"mqtts://gateway-bridge:{PASSWORDS['gateway-bridge']}@127.0.0.1:{broker.tls_port}",
        SSL_CERT_FILE=str(broker.tls.ca),  # the test CA instead of the system's store
        GATEWAY_MQTT_SHARED_GROUP="gateway",
        GATEWAY_MQTT_CLIENT_ID=f"gateway-bridge-test-{uuid.uuid4().hex[:6]}",
        NOTIFY_SOCKET=str(tmp_path / "notify"),
    )
    bridge = GatewayProcess(units.sandboxed("gateway-bridge@.service", "9101"), env, name="bridge-unit").start()
    try:
        ready = wait_for(lambda: ready_status(notify), timeout=30, what="READY=1")
        assert "connected" in ready, ready + bridge.log()
        publish_telemetry(broker, seq=1)
        wait_for(lambda: stored_seqs() == [1], timeout=15, what="the first event")
    finally:
        assert bridge.kill(signal.SIGTERM) == 0, bridge.log()
        notify.close()
    publish_telemetry(broker, seq=2)  # the stopped bridge's share: queued in its session
    retire = GatewayProcess(units.sandboxed("gateway-bridge-retire@.service", "9101"), env, name="retire-unit")
    with running(retire):
        assert retire.process is not None
        assert retire.process.wait(timeout=30) == 0, retire.log()
    assert stored_seqs() == [1, 2], retire.log()
    assert "Traceback" not in bridge.log() + retire.log(), bridge.log() + retire.log()


def publish_telemetry(broker: Broker, *, seq: int) -> None:
    with clients(broker, "dev-2") as (device,):
        device.publish("devices/dev-2/telemetry", f'{{"seq": {seq}, "temp": 21.5}}'.encode())


def stored_seqs() -> list[int | None]:
    return list(Event.objects.filter(device_id="dev-2", kind="telemetry").values_list("seq", flat=True))


def ready_status(notify: socket.socket) -> str | None:
    """The STATUS= sent with READY=1, or None for another notification."""
    lines = notify.recv(4096).decode().splitlines()
    if "READY=1" not in lines:
        return None
    return next((line for line in lines if line.startswith("STATUS=")), "STATUS=")
