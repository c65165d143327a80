"""Broker faults (issue 8, the reliability matrix): a private Mosquitto is restarted, kept away, or cut off half-open
under a running gateway (Daphne + ``runbridge`` on Redis and a fresh PostgreSQL database), and a retained command
is left on a command topic. What is checked is what a user sees: events in a WebSocket client, /readyz, /metrics
and commands' states.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_bridge.simulator import SimulatedDevice, SimulatorConfig
from mqtt_bridge.topics import Channel, Topics
from tests.faults.harness import (
    DaphneAndBridge,
    TcpProxy,
    Watcher,
    bridge_metric,
    fresh_postgres_database,
    operator_token,
    redis_database,
    stored_event_ids,
    watching,
)
from tests.support import (
    GatewayProcess,
    PrivateMosquitto,
    free_port,
    gateway_env,
    manage,
    require_mosquitto_binary,
    wait_for,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

REDIS_DB = 11  # this file's own database on the machine's Redis
KEEPALIVE = 5  # seconds: GATEWAY_MQTT_KEEPALIVE's minimum, so a half-open connection is found quickly
OUTAGE = 120.0  # seconds the broker is away in the long-outage case (the issue asks for two minutes)
BACKOFF_CAP = 30.0  # mqtt_bridge.bridge.BridgeSettings.backoff_cap: the longest wait between two connection attempts


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    """This file's Redis database, emptied (the channel layer of the gateway under test)."""
    return redis_database(REDIS_DB)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    """A Mosquitto of the test's own that keeps sessions and retained messages across a restart."""
    require_mosquitto_binary()
    mosquitto = PrivateMosquitto(port=free_port(), directory=tmp_path, persistence=True).start()
    yield mosquitto
    mosquitto.stop()


# --- the gateway under test ---------------------------------------------------------------------------------------


def gateway_under_test(database_url: str, redis_url: str, mqtt_port: int, **settings: str) -> DaphneAndBridge:
    """Daphne + ``runbridge`` on a topic prefix of their own, the bridge with a persistent session (600 s)."""
    run = uuid.uuid4().hex[:8]
    return DaphneAndBridge(
        database_url,
        redis_url,
        mqtt_port,
        prefix=f"f1-{run}/devices",
        client_id=f"f1-bridge-{run}",
        extra_env={"GATEWAY_MQTT_SESSION_EXPIRY": "600", **settings},
    )


def readyz(port: int) -> tuple[int, dict[str, Any]] | None:
    """/readyz's status and body; None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return None


@contextlib.contextmanager
def explained(*gateways: DaphneAndBridge | GatewayProcess) -> Iterator[None]:
    """Add the gateway processes' logs to a failed assertion."""
    try:
        yield
    except AssertionError as exc:
        logs = "\n".join(item.logs() if isinstance(item, DaphneAndBridge) else item.log()[-6000:] for item in gateways)
        raise AssertionError(f"{exc}\n{logs}") from None


def cpu_seconds(process: GatewayProcess) -> float:
    """User + system CPU time the process has used so far."""
    assert process.process is not None
    fields = Path(f"/proc/{process.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reconnect_delays(log: str) -> list[float]:
    """The waits the bridge announced between connection attempts (``reconnecting in X s``), in order."""
    return [float(delay) for delay in re.findall(r"reconnecting in ([0-9.]+) s", log)]


def assert_capped_backoff(delays: list[float]) -> None:
    """Each wait lies in the backoff's range for its attempt: at least initial / 2 (0.25 s, shown rounded), at most
    min(cap, 0.5 * 2**attempt) (mqtt_bridge/backoff.py): growing, capped, never a tight loop."""
    assert delays, "the bridge never announced a reconnect"
    for attempt, delay in enumerate(delays):
        ceiling = min(BACKOFF_CAP, 0.5 * 2**attempt)
        assert 0.2 <= delay <= ceiling + 0.05, f"wait {attempt} was {delay} s, outside [0.25, {ceiling}]: {delays}"


# --- devices ------------------------------------------------------------------------------------------------------


class Devices(threading.Thread):
    """Devices publishing telemetry ``{"seq": n, "v": n}`` at QoS 1, ``rate`` messages per second in all, over a few
    paho connections that reconnect on their own every second. paho keeps what it could not send (or what was not
    acknowledged) and sends it again after reconnecting, as firmware with a persistent outbox does, so every message
    is eventually acknowledged by the broker: paho reports each one once (``on_publish``)."""

    def __init__(self, port: int, prefix: str, count: int, rate: float, connections: int = 2) -> None:
        super().__init__(name="devices", daemon=True)
        self._port = port
        self._topics = Topics(prefix)
        self._device_ids = [f"d{number:02d}" for number in range(count)]
        self._interval = 1 / rate
        self._connections = connections
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._clients: list[mqtt.Client] = []
        self.published: list[tuple[str, int]] = []  # (device, seq), in publishing order
        self.acknowledged_at: list[float] = []  # when the broker acknowledged each message
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._clients = [self._client(number) for number in range(self._connections)]
            started = time.monotonic()
            while not self._halt.is_set():
                sent = len(self.published)
                device_id = self._device_ids[sent % len(self._device_ids)]
                seq = sent // len(self._device_ids) + 1
                topic = self._topics.device(device_id, Channel.TELEMETRY)
                info = self._clients[sent % len(self._clients)].publish(topic, f'{{"seq":{seq},"v":{seq}}}', qos=1)
                assert info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN), mqtt.error_string(info.rc)
                with self._lock:
                    self.published.append((device_id, seq))
                self._halt.wait(max(0.0, started + (sent + 1) * self._interval - time.monotonic()))
        except BaseException as exc:
            self.error = exc

    def _client(self, number: int) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"f1-devices-{uuid.uuid4().hex[:6]}-{number}")
        client.reconnect_delay_set(min_delay=1, max_delay=1)
        client.max_inflight_messages_set(100)
        client.on_publish = self._on_publish
        client.connect("127.0.0.1", self._port)
        client.loop_start()
        return client

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            self.acknowledged_at.append(time.monotonic())

    def all_acknowledged(self) -> bool:
        with self._lock:
            return len(self.acknowledged_at) == len(self.published)

    def finish(self) -> set[tuple[str, int]]:
        """Stop publishing, wait until the broker has acknowledged everything; every (device, seq) published."""
        self._halt.set()
        self.join(10)
        assert self.error is None, f"the devices failed: {self.error!r}"
        wait_for(self.all_acknowledged, timeout=60, interval=0.1, what="the broker to acknowledge every message")
        self.stop()
        return set(self.published)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
        self._clients = []


def check_everything_once(
    watcher: Watcher, expected: set[tuple[str, int]], gateway: DaphneAndBridge, within: float
) -> None:
    """Every message published stored once, and the watcher has every stored event once (and nothing else)."""

    def delivered() -> bool:
        stored_ids = stored_event_ids(gateway.database_url)
        return expected <= watcher.telemetry_seen() and set(watcher.received_ids()) == stored_ids

    wait_for(
        delivered,
        timeout=within,
        interval=0.2,
        what=f"all {len(expected)} messages stored and on the WebSocket",
    )
    watcher.check("watcher", expected)
    stored = gateway.metric("gateway_events_stored_total", kind="telemetry")
    assert stored == len(expected), f"{stored} telemetry events stored for {len(expected)} messages published"


@contextlib.contextmanager
def flowing_through_proxy(
    broker: PrivateMosquitto, database_url: str, redis_url: str, *, rate: int, **settings: str
) -> Iterator[tuple[TcpProxy, DaphneAndBridge, Watcher, Devices]]:
    """A gateway whose bridge reaches ``broker`` through a ``TcpProxy``, a watching WebSocket client, and 20 devices
    publishing ``rate`` messages per second straight to the broker; yielded once ``rate`` of them reached the watcher.
    All stopped afterwards; a failed assertion gets the processes' logs."""
    proxy = TcpProxy(broker.port).start()
    gateway = gateway_under_test(database_url, redis_url, proxy.port, **settings)
    with contextlib.ExitStack() as stack, explained(gateway):
        stack.callback(proxy.stop)
        stack.callback(gateway.stop)
        gateway.start()
        token = operator_token(database_url, "f1")
        gateway.wait_ready()
        watcher = stack.enter_context(watching(gateway.web_port, token))
        devices = Devices(broker.port, gateway.prefix, count=20, rate=rate)  # straight to the broker
        devices.start()
        stack.callback(devices.stop)
        wait_for(lambda: len(watcher.telemetry) >= rate, timeout=15, what="telemetry flowing to the WebSocket")
        yield proxy, gateway, watcher, devices


# --- the cases ----------------------------------------------------------------------------------------------------


def test_broker_restart_while_devices_publish_loses_and_repeats_nothing(broker, database, redis_url, capsys):
    """Row "broker restart while devices publish at QoS 1": the bridge reconnects with capped, jittered backoff,
    resubscribes and resumes its persistent session (saved by the broker across the restart), and every stored
    event reaches a watching WebSocket client once.

    To show that the session is what carries messages across the restart, the bridge reaches the broker through a
    proxy that stops forwarding a second before the broker goes down: what the devices publish in that second exists
    only in the broker's session for the bridge (queued or in flight, never seen by the bridge) when the broker saves
    it, so it can only arrive through the resumed session."""
    with flowing_through_proxy(broker, database, redis_url, rate=200) as (proxy, gateway, watcher, devices):
        assert proxy.stall() == 1, "the bridge's one connection"
        stalled_at = time.monotonic()
        time.sleep(1)
        broker.stop()  # SIGTERM: Mosquitto saves its sessions (with their queued and in-flight messages)
        stopped_at = time.monotonic()
        only_in_session = sum(1 for at in devices.acknowledged_at[:] if stalled_at <= at < stopped_at)
        assert proxy.cut() == 1  # the bridge's connection closes, as a direct one would with the broker gone
        wait_for(gateway.disconnected, timeout=10, what="the bridge to notice the broker went away")
        time.sleep(max(0.0, 3.0 - (time.monotonic() - stopped_at)))
        broker.start()
        back_at = time.monotonic()
        wait_for(gateway.connected, timeout=20, interval=0.05, what="the bridge back on the restarted broker")
        reconnected_at = time.monotonic()
        time.sleep(2)  # devices keep publishing on the resumed session
        expected = devices.finish()
        check_everything_once(watcher, expected, gateway, within=30)
        complete_at = time.monotonic()

        reconnects = gateway.metric("gateway_mqtt_reconnects_total") or 0
        assert gateway.bridge is not None
        delays = reconnect_delays(gateway.bridge.log())
        assert_capped_backoff(delays)
        assert 1 <= reconnects <= 10, f"{reconnects} reconnects for a 3 s outage"
        assert reconnected_at - back_at <= delays[-1] + 1.5, "not back at its first attempt"
        assert only_in_session >= 50, f"only {only_in_session} messages published while the proxy held them back"

    with capsys.disabled():
        print(
            f"\nbroker restart: down {back_at - stopped_at:.1f} s; bridge connected again "
            f"{reconnected_at - back_at:.2f} s after the broker was back ({reconnects:.0f} failed attempts, waits "
            f"{delays} s); {only_in_session} messages existed only in the bridge's saved session; {len(expected)} "
            f"messages all on the WebSocket once, {complete_at - reconnected_at:.1f} s after the reconnect"
        )


@pytest.mark.timeout(OUTAGE + 120)  # the outage itself is as long as the suite's default timeout
def test_broker_down_at_start_and_for_two_minutes(tmp_path, database, redis_url, capsys):
    """Row "broker down when the gateway starts; broker down for two minutes": Daphne + runbridge and a one-process
    rungateway start with no broker and wait for two minutes: they stay up, /readyz says the broker is down (quoting
    the bridge's connection error), they retry without a tight loop (CPU time and reconnect counter stay small), and
    they connect when the broker comes: an event then reaches a watching WebSocket client."""
    require_mosquitto_binary()
    broker = PrivateMosquitto(port=free_port(), directory=tmp_path, persistence=True)  # not started yet
    gateway = gateway_under_test(database, redis_url, broker.port)
    run = uuid.uuid4().hex[:8]
    single_port = free_port()
    with contextlib.ExitStack() as stack:
        stack.callback(broker.stop)
        single_database = stack.enter_context(fresh_postgres_database())
        single_env = gateway_env(
            DATABASE_URL=single_database,
            MQTT_URL=f"mqtt://127.0.0.1:{broker.port}",
            GATEWAY_TOPIC_PREFIX=f"f1-single-{run}/devices",
            GATEWAY_MQTT_CLIENT_ID=f"f1-single-{run}",
        )
        single = GatewayProcess(manage("rungateway", "--bind", f"127.0.0.1:{single_port}"), single_env, name="single")
        stack.enter_context(explained(gateway, single))
        stack.callback(single.kill, signal.SIGTERM)
        stack.callback(gateway.stop)
        started_at = time.monotonic()
        gateway.start()
        single.start()
        token = operator_token(database, "f1")
        processes = [*gateway.processes(), single]
        web_ports = [gateway.web_port, single_port]

        def broker_down_everywhere() -> bool:
            answers = [readyz(port) for port in web_ports]
            return all(answer is not None and answer[0] == 503 for answer in answers)

        wait_for(broker_down_everywhere, timeout=30, interval=0.2, what="both web sides answering /readyz")
        watcher = stack.enter_context(watching(gateway.web_port, token))
        cpu_at_start = {process.name: cpu_seconds(process) for process in processes}
        samples = 0
        refused = f"cannot connect to mqtt://127.0.0.1:{broker.port}"
        while time.monotonic() - started_at < OUTAGE:
            assert all(process.alive() for process in processes), "a gateway process exited during the outage"
            for port in web_ports:
                answer = readyz(port)
                assert answer is not None, f"/readyz on {port} did not answer"
                status, body = answer
                assert status == 503, body
                assert body["checks"]["broker"]["ok"] is False, body
                assert refused in body["checks"]["broker"]["detail"], body  # the bridge's own error
                assert body["checks"]["database"]["ok"] and body["checks"]["channel_layer"]["ok"], body
            samples += 1
            time.sleep(min(5.0, max(0.0, OUTAGE - (time.monotonic() - started_at))))
        cpu = {process.name: cpu_seconds(process) - cpu_at_start[process.name] for process in processes}
        reconnects = [
            gateway.metric("gateway_mqtt_reconnects_total"),
            bridge_metric(single_port, "gateway_mqtt_reconnects_total"),
        ]
        assert gateway.bridge is not None
        delays = reconnect_delays(gateway.bridge.log())
        single_delays = reconnect_delays(single.log())

        broker.start()
        back_at = time.monotonic()

        def connected_everywhere() -> bool:
            return all((answer := readyz(port)) is not None and answer[0] == 200 for port in web_ports)

        wait_for(connected_everywhere, timeout=BACKOFF_CAP + 15, interval=0.1, what="both gateways ready")
        ready_after = time.monotonic() - back_at
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"f1-late-{run}")
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        topic = Topics(gateway.prefix).device("late-1", Channel.TELEMETRY)
        device.publish(topic, b'{"seq":1,"v":1}', qos=1).wait_for_publish(10)
        device.disconnect()
        device.loop_stop()
        wait_for(lambda: ("late-1", 1) in watcher.telemetry, timeout=10, what="an event after the broker came back")

        assert all(process.alive() for process in processes), "a gateway process exited"
        assert_capped_backoff(delays)
        assert_capped_backoff(single_delays)
        assert delays != single_delays, "two gateways waited alike: no jitter"
        assert all(count is not None and 1 <= count <= 25 for count in reconnects), reconnects
        assert all(seconds < 0.1 * OUTAGE for seconds in cpu.values()), f"CPU seconds during the outage: {cpu}"

    with capsys.disabled():
        print(
            f"\nbroker down {back_at - started_at:.0f} s from the gateway's start: processes up throughout, /readyz "
            f"503 (broker) in {samples} samples; failed connection attempts (runbridge, rungateway) {reconnects}; "
            f"CPU seconds during the outage { ({name: round(seconds, 2) for name, seconds in cpu.items()}) }; "
            f"last waits {delays[-3:]} / {single_delays[-3:]} s; both ready {ready_after:.1f} s after the broker "
            f"came back"
        )


def test_half_open_broker_connection_is_detected_and_replaced(broker, database, redis_url, capsys):
    """Row "half-open TCP to the broker": a proxy between the bridge and the broker stops forwarding without closing
    either socket; the bridge finds out within about two keepalive intervals, reconnects, and every stored event
    still reaches a watching WebSocket client once."""
    keepalive = {"GATEWAY_MQTT_KEEPALIVE": str(KEEPALIVE)}
    flow = flowing_through_proxy(broker, database, redis_url, rate=100, **keepalive)
    with flow as (proxy, gateway, watcher, devices):
        assert proxy.stall() == 1, "the bridge's one connection"
        stalled_at = time.monotonic()
        wait_for(gateway.disconnected, timeout=2 * KEEPALIVE + 10, interval=0.05, what="the half-open connection")
        detected_after = time.monotonic() - stalled_at
        wait_for(gateway.connected, timeout=10, interval=0.05, what="the bridge on a new connection")
        reconnected_after = time.monotonic() - stalled_at
        time.sleep(1)
        expected = devices.finish()
        check_everything_once(watcher, expected, gateway, within=30)

        assert detected_after <= 2 * KEEPALIVE + 3, f"found after {detected_after:.1f} s (keepalive {KEEPALIVE} s)"
        assert proxy.accepted == 2, f"{proxy.accepted} connections through the proxy"

    with capsys.disabled():
        print(
            f"\nhalf-open: keepalive {KEEPALIVE} s; the bridge found the dead connection {detected_after:.1f} s after "
            f"the proxy stopped forwarding and was connected again after {reconnected_after:.1f} s; "
            f"{len(expected)} messages all on the WebSocket once"
        )


@dataclass
class CommandWire:
    """Sees every command the broker routes on the test's prefix, with the retain flag as it was published."""

    port: int
    prefix: str
    seen: list[tuple[str, bool, dict[str, Any]]] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def start(self) -> CommandWire:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"f1-wire-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
        )
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        self.client.subscribe(f"{self.prefix}/+/commands/+", options=options)
        assert self.subscribed.wait(5)
        return self

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.seen.append((message.topic, bool(message.retain), json.loads(message.payload)))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def command_device(port: int, prefix: str, device_id: str) -> SimulatedDevice:
    """The bundled simulator's device: answers each command id once, and ignores retained commands."""
    config = SimulatorConfig(host="127.0.0.1", port=port, prefix=prefix, protocol="5", reply_delay=0.05)
    device = SimulatedDevice(config, Topics(prefix), device_id, random.Random(1))
    device.connect()
    assert device.subscribed.wait(10), f"{device_id} did not subscribe to its commands"
    return device


def test_a_retained_command_is_never_executed_again(broker, database, redis_url, capsys):
    """Row "a retained message on a command topic": the gateway publishes commands with retain off (protocol 7.1:
    "QoS 1, never retained") and never subscribes to command topics, so a command that a buggy tool left retained
    is not published again by a restarted bridge; and a device (the bundled simulator) that reconnects and receives
    it retained ignores it, as the contract asks of devices."""
    gateway = gateway_under_test(database, redis_url, broker.port)
    device_id = "cmd-1"
    with contextlib.ExitStack() as stack, explained(gateway):
        stack.callback(gateway.stop)
        gateway.start()
        token = operator_token(database, "f1")
        gateway.wait_ready()
        watcher = stack.enter_context(watching(gateway.web_port, token))
        wire = CommandWire(broker.port, gateway.prefix).start()
        stack.callback(wire.stop)
        device = command_device(broker.port, gateway.prefix, device_id)
        stack.callback(lambda: device.disconnect())  # whichever device is current then
        wait_for(lambda: device_id in watcher.online, timeout=10, what=f"{device_id} online on the WebSocket")

        watcher.ws.send(json.dumps({"op": "command", "device": device_id, "name": "reboot", "params": {"n": 1}}))
        command_id = wait_for(watcher.first_command_id, timeout=10, what="the command's first state")
        wait_for(lambda: watcher.state_of(command_id) == "succeeded", timeout=10, what="the device's answer")
        assert [(retain, body["id"]) for _, retain, body in wire.seen] == [(False, command_id)], wire.seen

        # A buggy operator tool publishes a command of its own, retained, on the same command topic.
        stray_id = uuid.uuid4().hex
        tool = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"f1-tool-{uuid.uuid4().hex[:8]}")
        tool.connect("127.0.0.1", broker.port)
        tool.loop_start()
        stray = json.dumps({"id": stray_id, "params": {}, "ts": time.time(), "expires": time.time() + 600})
        topic = Topics(gateway.prefix).command(device_id, "reboot")
        tool.publish(topic, stray, qos=1, retain=True).wait_for_publish(5)
        tool.disconnect()
        tool.loop_stop()
        wait_for(lambda: len(wire.seen) == 2, timeout=5, what="the stray command on the wire")
        wait_for(lambda: device.replied == 2, timeout=5, what="the device to act on the live stray command once")

        exit_status = gateway.restart_bridge()
        wait_for(gateway.connected, timeout=20, what="the restarted bridge")
        device.disconnect()  # a device restart: the broker hands it the retained command on subscribing
        device = command_device(broker.port, gateway.prefix, device_id)
        wait_for(lambda: device.ignored == 1, timeout=5, what="the restarted device to see the retained command")
        time.sleep(3)  # three command poll intervals for anything to be published again

        assert exit_status == 0, "the bridge stops cleanly on SIGTERM"
        assert device.replied == 0, "the restarted device executed a retained command"
        assert gateway.metric("gateway_commands_published_total") == 0, "the restarted bridge published a command"
        assert [(retain, body["id"]) for _, retain, body in wire.seen] == [(False, command_id), (True, stray_id)]
        states = [state for state, _ in watcher.command_states(command_id)]
        assert states == ["pending", "sent", "succeeded"], states
        assert len(watcher.commands) == 3, f"command frames: {watcher.commands}"

    with capsys.disabled():
        print(
            "\nretained command: the gateway's command went out with retain off; a stray retained command was not "
            "published again by the restarted bridge and was ignored by the restarted device"
        )
