"""Load and input faults (issue 8): a WebSocket client that stops reading, a burst of messages, a device flapping
online and offline, device clocks far off and wall-clock jumps.

Each case runs ``rungateway`` (Daphne, the bridge and the in-memory layer in one process) as a real subprocess on a
fresh PostgreSQL database, with a topic prefix of its own on the machine's Mosquitto (the burst on a Mosquitto of its
own, sized like deploy/mosquitto/gateway.conf), and judges what a user sees: WebSocket frames, the HTTP API,
``/metrics`` and the process's RSS.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import os
import socket
import struct
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, LiteralString

import paho.mqtt.client as mqtt
import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import connections
from django.utils import timezone
from paho.mqtt.enums import CallbackAPIVersion
from websockets.sync.client import connect

from devices import services
from devices.models import Command, Device
from devices.permissions import access_for
from mqtt_bridge.commands import CommandDispatcher, CommandSettings
from mqtt_bridge.store import BridgeStore
from mqtt_bridge.topics import Topics
from tests.faults.harness import Watcher, bridge_metric, fresh_database, operator_token, rss_mb
from tests.support import (
    MQTT_HOST,
    MQTT_PORT,
    GatewayProcess,
    PrivateMosquitto,
    free_port,
    gateway_env,
    http_ok,
    manage,
    require_mosquitto,
    require_mosquitto_binary,
    require_postgres,
    wait_for,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres]


# --- the gateway ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """One fresh PostgreSQL database for the module's cases (each case has its own prefix and devices)."""
    require_mosquitto()
    with fresh_database(require_postgres(), prefix="gateway_load") as url:
        yield url


@pytest.fixture(scope="module")
def token(database: str) -> str:
    return operator_token(database, "load")


@dataclass
class Gateway:
    """``rungateway`` on its own port and topic prefix; ``settings`` are extra environment variables."""

    database_url: str
    mqtt_port: int = MQTT_PORT
    settings: dict[str, str] = field(default_factory=dict)
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    port: int = field(default_factory=free_port)
    process: GatewayProcess | None = None

    @property
    def prefix(self) -> str:
        return f"load-{self.run}/devices"

    def start(self) -> Gateway:
        env = gateway_env(
            DATABASE_URL=self.database_url,
            MQTT_URL=f"mqtt://{MQTT_HOST}:{self.mqtt_port}",
            GATEWAY_TOPIC_PREFIX=self.prefix,
            GATEWAY_MQTT_CLIENT_ID=f"load-{self.run}",
            GATEWAY_MQTT_SESSION_EXPIRY="30",  # short: the machine's Mosquitto forgets it soon after the case
            **self.settings,
        )
        self.process = GatewayProcess(manage("rungateway", "--bind", f"127.0.0.1:{self.port}"), env, name="load")
        self.process.start()
        wait_for(self._ready, timeout=30, interval=0.2, what="rungateway ready (/readyz)")
        return self

    def _ready(self) -> bool:
        assert self.process is not None and self.process.alive(), self.log()
        return http_ok(f"http://127.0.0.1:{self.port}/readyz")

    def metric(self, name: str, **labels: str) -> float:
        return bridge_metric(self.port, name, **labels) or 0.0

    def rss_mb(self) -> float:
        assert self.process is not None
        return rss_mb(self.process)

    def api(self, path: str, token: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill(15)


@contextlib.contextmanager
def gateway(database_url: str, *, mqtt_port: int = MQTT_PORT, **settings: str) -> Iterator[Gateway]:
    running = Gateway(database_url, mqtt_port=mqtt_port, settings=settings)
    try:
        yield running.start()
    finally:
        running.stop()


# --- devices ----------------------------------------------------------------------------------------------------


def paho_client(port: int = MQTT_PORT) -> mqtt.Client:
    """A connected paho client (MQTT 3.1.1) with its network loop running."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"load-{uuid.uuid4().hex[:10]}")
    client.max_inflight_messages_set(1000)
    client.connect(MQTT_HOST, port)
    client.loop_start()
    return client


def telemetry(
    prefix: str, devices: list[str], total: int, *, first: int = 0, pad: dict[str, str] | None = None
) -> Iterator[tuple[str, str]]:
    """``total`` telemetry messages over ``devices`` in turn, message n (from ``first``) with ``seq`` and ``v`` n;
    each stamped with the wall clock (``sent``) as it is handed to the publisher."""
    for number in range(first, first + total):
        values: dict[str, Any] = {"seq": number, "v": number, "sent": time.time(), **(pad or {})}
        yield f"{prefix}/{devices[number % len(devices)]}/telemetry", json.dumps(values)


PUBLISH_WINDOW = 20000


def publish_all(client: mqtt.Client, messages: Iterable[tuple[str, str]], *, rate: float | None = None) -> float:
    """Publish ``(topic, payload)`` at QoS 1 (paced at ``rate`` per second when given); return when the broker
    acknowledged all of them, with how many per second that was."""
    started = time.monotonic()
    infos = []
    for number, (topic, payload) in enumerate(messages):
        if rate is not None and number % 10 == 0:
            delay = started + number / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if number >= PUBLISH_WINDOW:  # paho refuses more than 65,535 unacknowledged messages
            infos[number - PUBLISH_WINDOW].wait_for_publish(60)
        info = client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish {number}: {mqtt.error_string(info.rc)}"
        infos.append(info)
    for info in infos:
        info.wait_for_publish(60)
        assert info.is_published(), f"message {info.mid} not acknowledged by the broker within 60 s"
    return len(infos) / (time.monotonic() - started)


class RssSampler(threading.Thread):
    """The gateway process's RSS every 100 ms: the first sample and the peak, in MiB."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(name="rss", daemon=True)
        self._gateway = gw
        self._halt = threading.Event()
        self.first = self.peak = gw.rss_mb()

    def run(self) -> None:
        while not self._halt.wait(0.1):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, self._gateway.rss_mb())

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@contextlib.contextmanager
def sampling_rss(gw: Gateway) -> Iterator[RssSampler]:
    sampler = RssSampler(gw)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


class TimedWatcher(Watcher):
    """A Watcher that also keeps, per telemetry message, how long after its publish it arrived (publishers put their
    wall clock in the value ``sent``), and every status frame in arrival order."""

    def __init__(self, port: int, token: str, expect: int = 0) -> None:
        super().__init__(port, token, expect)
        self.latencies: list[float] = []
        self.statuses: list[dict[str, Any]] = []

    def _record(self, event: dict[str, Any]) -> None:
        super()._record(event)
        if event.get("type") == "telemetry" and "sent" in event["values"]:
            self.latencies.append(time.time() - event["values"]["sent"])
        elif event.get("type") == "status":
            self.statuses.append(event)


@contextlib.contextmanager
def timed_watcher(port: int, token: str, expect: int = 0) -> Iterator[TimedWatcher]:
    watcher = TimedWatcher(port, token, expect)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.close()


# --- a WebSocket client that stops reading ----------------------------------------------------------------------


class StalledSocket:
    """A raw WebSocket client with a tiny receive buffer: it subscribes to every device, then reads nothing."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws/?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.received = b""
        while b"\r\n\r\n" not in self.received:
            self.received += self.sock.recv(4096)
        assert self.received.startswith(b"HTTP/1.1 101"), self.received[:200]
        self.send_text(json.dumps({"op": "subscribe", "devices": "*"}))

    def send_text(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        assert len(payload) < 126
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def read_to_end(self, timeout: float) -> bool:
        """Read what the server sent until it closes the connection; False if it is still open after ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def frames(self) -> list[tuple[int, bytes]]:
        """The (opcode, payload) of every complete frame read so far."""
        data = self.received[self.received.index(b"\r\n\r\n") + 4 :]
        frames = []
        while len(data) >= 2:
            length, offset = data[1] & 0x7F, 2
            if length == 126:
                (length,), offset = struct.unpack("!H", data[2:4]), 4
            elif length == 127:
                (length,), offset = struct.unpack("!Q", data[2:10]), 10
            if len(data) < offset + length:
                break
            frames.append((data[0] & 0x0F, data[offset : offset + length]))
            data = data[offset + length :]
        return frames

    def close(self) -> None:
        self.sock.close()


SLOW_RATE = 400.0  # telemetry messages per second during the slow-client case
SLOW_SECONDS = 6.0
SLOW_DEVICES = 20
# About 4 KB per event frame: the kernel's buffers on loopback take up to ~4 MB of a stalled socket's frames before
# Twisted's own buffer fills, so this fills them within a few seconds.
PADDING = {f"pad{number}": "x" * 1000 for number in range(4)}


def test_a_client_that_stops_reading_is_bounded_then_closed_and_slows_nobody_else(database, token, capsys):
    """Row: a slow WebSocket client that stops reading. Its queue is bounded (events beyond it become a gap,
    counted in gateway_ws_events_dropped_total{reason="queue_full"}), it is closed (code 4408, counted in
    gateway_ws_stalled_total) once it has read nothing for GATEWAY_WS_STALL_TIMEOUT, and a second client that
    reads gets every message, on time, meanwhile."""
    with (
        gateway(database, GATEWAY_WS_STALL_TIMEOUT="2", GATEWAY_WS_QUEUE_MAX="200") as gw,
        timed_watcher(gw.port, token) as reader,
    ):
        stalled = StalledSocket(gw.port, token)
        wait_for(lambda: gw.metric("gateway_ws_clients") == 2, timeout=10, what="both sockets open")
        publisher = paho_client()
        devices = [f"slow-{gw.run}-{number:02d}" for number in range(SLOW_DEVICES)]
        total = int(SLOW_RATE * SLOW_SECONDS)
        with sampling_rss(gw) as rss:
            rate = publish_all(publisher, telemetry(gw.prefix, devices, total, pad=PADDING), rate=SLOW_RATE)
        publisher.disconnect()
        publisher.loop_stop()
        expected = {(devices[number % SLOW_DEVICES], number) for number in range(total)}
        wait_for(lambda: set(reader.telemetry) >= expected, timeout=20, what="every message on the reading client")
        closed = stalled.read_to_end(timeout=10)
        stalled.close()
        wait_for(lambda: gw.metric("gateway_ws_clients") == 1, timeout=10, what="the stalled socket gone")
        dropped = gw.metric("gateway_ws_events_dropped_total", reason="queue_full")
        stalled_closed = gw.metric("gateway_ws_stalled_total")
        reader.check("reader", expected)
        latencies = sorted(reader.latencies)

    assert closed, f"the stalled socket is still open:\n{gw.log()[-3000:]}"
    assert stalled_closed == 1, f"gateway_ws_stalled_total = {stalled_closed}"
    assert dropped > 0, "the stalled socket's queue never overflowed into a gap"
    p99, worst = latencies[int(len(latencies) * 0.99)], latencies[-1]
    assert p99 < 1.0 and worst < 3.0, f"the reading client was slowed down: p99 {p99:.3f} s, worst {worst:.3f} s"
    with capsys.disabled():
        print(
            f"\nslow client: {total} messages at {rate:.0f} msg/s; stalled socket closed after "
            f"{dropped:.0f} events dropped for it; reader latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms,"
            f" p99 {p99 * 1000:.0f} ms, worst {worst * 1000:.0f} ms; RSS {rss.first:.0f} -> peak {rss.peak:.0f} MiB"
        )


# --- a burst ----------------------------------------------------------------------------------------------------

# The 100,000 fit (measured on this 2-core machine, shared with other test runs: one paho publisher ~5,000-6,000
# msg/s at QoS 1, the gateway storing and delivering ~1,500-3,100 msg/s, so 35-75 s in all). GATEWAY_FAULTS_BURST
# makes it smaller where that is too slow.
BURST = int(os.environ.get("GATEWAY_FAULTS_BURST", "100000"))
# What bounds the gateway's memory in a burst is its incoming MQTT queue (GATEWAY_MQTT_QUEUE_MAX, 20,000, plus the
# window): Mosquitto 2.0.11 sends past the receive maximum once the bridge acknowledges (docs/protocol.md, section
# 3). Measured peaks: +58 MiB at 20,000, +125-139 MiB at 40,000 and at 100,000, the same after three bursts of 20,000.
BURST_RSS_GROWTH_MAX = 200.0
BURST_DEVICES = 100


def stored_telemetry(database_url: str, devices: list[str]) -> tuple[int, int]:
    """How many telemetry events of ``devices`` are stored, and how many distinct (device, seq) among them."""
    [row] = query(
        database_url,
        "SELECT count(*), count(DISTINCT (device_id, seq)) FROM devices_event "
        "WHERE kind = 'telemetry' AND device_id = ANY(%s)",
        devices,
    )
    return int(row[0]), int(row[1])


def query(database_url: str, sql: LiteralString, *params: Any) -> list[tuple[Any, ...]]:
    """Every row ``sql`` (with ``params``) returns on ``database_url``."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    """A Mosquitto of the test's own, queueing up to 100,000 messages per client (deploy/mosquitto/gateway.conf)."""
    require_mosquitto_binary()
    broker = PrivateMosquitto(port=free_port(), directory=tmp_path).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.timeout(180)
def test_a_burst_is_stored_whole_with_bounded_memory_and_latency_back_to_normal(
    database, token, private_broker, capsys
):
    """Row: a burst of 100,000 messages (BURST; see above), published as fast as one client can. Memory (the gateway
    process's RSS) stays bounded, nothing stored is lost (every (device, seq) exactly once in the database and on a
    watching client, with no gap), the backlog drains, and the end-to-end latency is back to normal right after."""
    with (
        gateway(database, mqtt_port=private_broker.port) as gw,
        timed_watcher(gw.port, token, expect=BURST) as watcher,
    ):
        devices = [f"burst-{gw.run}-{number:03d}" for number in range(BURST_DEVICES)]
        publisher = paho_client(private_broker.port)
        with sampling_rss(gw) as rss:
            started = time.monotonic()
            rate = publish_all(publisher, telemetry(gw.prefix, devices, BURST))
            published = time.monotonic()
            wait_for(
                lambda: gw.metric("gateway_events_stored_total", kind="telemetry") >= BURST,
                timeout=100,
                interval=0.2,
                what="the whole burst stored",
            )
            stored_at = time.monotonic()
            wait_for(lambda: watcher.complete_at, timeout=20, interval=0.2, what="the whole burst on the client")
            drained = watcher.complete_at
        probes = probe_latency(publisher, gw.prefix, devices[0], watcher, first=BURST)
        publisher.disconnect()
        publisher.loop_stop()
        stored, distinct = stored_telemetry(database, devices)
        ingest = gw.metric("gateway_ingest_batch_size_count")
        discarded = gw.metric("gateway_mqtt_queue_dropped_total")
        reconnects = gw.metric("gateway_mqtt_reconnects_total")

    sent = BURST + len(probes.expected)
    assert (stored, distinct) == (sent, sent), f"stored {stored} ({distinct} distinct) of {sent}"
    watcher.check("watcher", {(devices[n % BURST_DEVICES], n) for n in range(BURST)} | probes.expected)
    growth = rss.peak - rss.first
    assert growth < BURST_RSS_GROWTH_MAX, f"RSS grew by {growth:.0f} MiB ({rss.first:.0f} -> {rss.peak:.0f})"
    assert max(probes.latencies) < 1.0, f"latency after the burst: {probes.latencies}"
    with capsys.disabled():
        print(
            f"\nburst: {BURST} messages published at {rate:.0f} msg/s in {published - started:.1f} s; all stored and "
            f"on the client {drained - started:.1f} s after the first publish ({BURST / (drained - started):.0f} "
            f"msg/s end to end, backlog drained {drained - published:.1f} s after the last publish, "
            f"{ingest:.0f} ingest batches, all stored {stored_at - started:.1f} s after the first publish; "
            f"{discarded:.0f} discarded by the full incoming queue and redelivered after {reconnects:.0f} reconnects); "
            f"RSS {rss.first:.0f} -> peak {rss.peak:.0f} MiB; latency after the "
            f"burst: max {max(probes.latencies) * 1000:.0f} ms of {len(probes.latencies)} probes"
        )


@dataclass
class Probes:
    latencies: list[float]
    expected: set[tuple[str, int]]


def probe_latency(client: mqtt.Client, prefix: str, device: str, watcher: TimedWatcher, *, first: int) -> Probes:
    """Publish 10 telemetry messages, 100 ms apart, each waited for on ``watcher``: their end-to-end latencies."""
    before = len(watcher.latencies)
    expected = set()
    for seq in range(first, first + 10):
        publish_all(client, telemetry(prefix, [device], 1, first=seq))
        expected.add((device, seq))
        wait_for(lambda seq=seq: (device, seq) in watcher.telemetry, timeout=10, what=f"probe {seq}")
        time.sleep(0.1)
    return Probes(watcher.latencies[before:], expected)


# --- a device flapping ------------------------------------------------------------------------------------------

FLAPS = 30  # connect, online, unclean drop (the broker publishes the Last Will, offline): 10 cycles a second


@dataclass(frozen=True)
class Resources:
    """What a leak would grow in the gateway process: memory, open descriptors (sockets), threads."""

    rss_mb: float
    fds: int
    threads: int

    @classmethod
    def of(cls, gw: Gateway) -> Resources:
        assert gw.process is not None and gw.process.process is not None
        pid = gw.process.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
        threads = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:"))
        return cls(gw.rss_mb(), len(os.listdir(f"/proc/{pid}/fd")), threads)


def stored_statuses(database_url: str, device: str) -> list[tuple[int, bool]]:
    rows = query(
        database_url,
        "SELECT id, (body->>'online')::boolean FROM devices_event WHERE device_id = %s AND kind = 'status' ORDER BY id",
        device,
    )
    return [(int(event_id), bool(online)) for event_id, online in rows]


def online_device(status_topic: str) -> mqtt.Client:
    """A device that connects with its Last Will (``offline``, retained) and publishes ``online`` (retained). Its
    network loop is run here until the broker has the message, so it can be dropped at once (no loop thread)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"load-{uuid.uuid4().hex[:10]}")
    client.will_set(status_topic, "offline", qos=1, retain=True)
    client.connect(MQTT_HOST, MQTT_PORT)
    info = client.publish(status_topic, "online", qos=1, retain=True)
    deadline = time.monotonic() + 5
    while not info.is_published():
        assert time.monotonic() < deadline, "the broker did not acknowledge online"
        client.loop(0.01)
    return client


def drop(client: mqtt.Client) -> None:
    """End a device's connection the unclean way (no DISCONNECT), as a device losing power does: the broker
    publishes its Last Will."""
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_a_device_flapping_ten_times_a_second_ends_in_the_right_state_and_leaks_nothing(database, token, capsys):
    """Row: a device flapping online/offline 10 times a second. Every transition is stored in order (strictly
    alternating), the final state is right in the API and on a watching WebSocket, and the gateway process ends with
    the sockets, threads and memory it started with (a WebSocket client also connects and leaves each cycle)."""
    with gateway(database) as gw, timed_watcher(gw.port, token) as watcher:
        device = f"flap-{gw.run}"
        status = f"{gw.prefix}/{device}/status"
        watcher.ws.send(json.dumps({"op": "ping"}))  # settle: the watcher's socket is fully set up
        wait_for(lambda: gw.metric("gateway_ws_clients") == 1, timeout=10, what="the watcher counted")
        before = Resources.of(gw)
        started = time.monotonic()
        for cycle in range(FLAPS):
            due = started + (cycle + 1) / 10
            device_client = online_device(status)
            with connect(f"ws://127.0.0.1:{gw.port}/ws/?token={token}") as browser:
                browser.recv(timeout=5)  # hello
                browser.send(json.dumps({"op": "subscribe", "devices": [device]}))
                browser.recv(timeout=5)
            drop(device_client)
            time.sleep(max(0.0, due - time.monotonic()))
        flapped = time.monotonic() - started
        final = online_device(status)
        expected = 2 * FLAPS + 1
        try:
            wait_for(lambda: len(stored_statuses(database, device)) >= expected, timeout=15, what="every transition")
            wait_for(
                lambda: (
                    [e["online"] for e in watcher.statuses if e["device"] == device][-1:] == [True]
                    and len([e for e in watcher.statuses if e["device"] == device]) >= expected
                ),
                timeout=10,
                what="the final online on the watching client",
            )
            settled = time.monotonic() - started - flapped
            api = gw.api(f"/api/devices/{device}", token)["device"]
            wait_for(lambda: gw.metric("gateway_ws_clients") == 1, timeout=10, what="the browsers' sockets gone")
            after = wait_for(
                lambda: (found := Resources.of(gw)).fds <= before.fds + 2 and found,
                timeout=10,
                what="descriptors back to where they were",
            )
        finally:
            drop(final)
        statuses = stored_statuses(database, device)
        seen = [(e["id"], e["online"]) for e in watcher.statuses if e["device"] == device]

    assert len(statuses) == expected, f"{len(statuses)} transitions stored, {expected} happened"
    assert [online for _, online in statuses] == [index % 2 == 0 for index in range(expected)], statuses
    assert seen == statuses, "the watching client saw other transitions than were stored"
    assert api["online"] is True, f"the API says {api}"
    assert after.threads <= before.threads + 1, f"threads {before.threads} -> {after.threads}"
    assert after.rss_mb - before.rss_mb < 15, f"RSS {before.rss_mb:.0f} -> {after.rss_mb:.0f} MiB"
    with capsys.disabled():
        print(
            f"\nflapping: {FLAPS} connect/online/drop cycles in {flapped:.1f} s (each with a WebSocket client "
            f"joining and leaving), {expected} transitions stored in order, final state right on the client and in "
            f"the API {settled:.2f} s after the last; fds {before.fds} -> {after.fds}, threads {before.threads} -> "
            f"{after.threads}, RSS {before.rss_mb:.0f} -> {after.rss_mb:.0f} MiB"
        )


# --- clocks -----------------------------------------------------------------------------------------------------

YEAR = 365 * 86400.0
# Device clocks far off, interleaved with right ones: never set (0), 1970, far past, far future, negative.
DEVICE_CLOCK_OFFSETS = [0.0, None, 10 * YEAR, -10 * YEAR, None, 0.0, 80 * YEAR, None, -60 * YEAR, 0.0]


def test_device_clocks_far_off_never_reorder_stored_events(database, token, capsys):
    """Row: device clocks far off. Telemetry whose ``ts`` is decades in the past or future (or 0, or negative) is
    stored in arrival order with increasing ids and the gateway's own receive time; the device's ``ts`` is kept
    as ``device_ts`` (advisory), and the WebSocket and the API show the events in that same order."""
    with gateway(database) as gw, timed_watcher(gw.port, token) as watcher:
        device = f"clock-{gw.run}"
        now = time.time()
        sent = [
            now + offset if offset is not None else float(-86400 * number)
            for number, offset in enumerate(DEVICE_CLOCK_OFFSETS)
        ]
        messages = [
            (f"{gw.prefix}/{device}/telemetry", json.dumps({"seq": number, "v": number, "ts": device_ts}))
            for number, device_ts in enumerate(sent)
        ]
        publisher = paho_client()
        received_from = time.time()
        for message in messages:  # one at a time: each its own batch, so arrival order is publish order
            publish_all(publisher, [message])
            time.sleep(0.02)
        publisher.disconnect()
        publisher.loop_stop()
        received_until = time.time()
        wait_for(lambda: len(watcher.telemetry) == len(sent), timeout=10, what="every message on the client")
        stored = query(
            database,
            "SELECT id, seq, device_ts, ts FROM devices_event WHERE device_id = %s AND kind = 'telemetry' ORDER BY id",
            device,
        )
        events = gw.api(f"/api/devices/{device}", token)["events"]
        on_socket = watcher.received_ids()

    assert [seq for _, seq, _, _ in stored] == list(range(len(sent))), f"stored out of arrival order: {stored}"
    assert [device_ts for _, _, device_ts, _ in stored] == sent, "device ts not kept as sent"
    receive_times = [ts for _, _, _, ts in stored]
    assert receive_times == sorted(receive_times), "the gateway's receive times go backwards"
    assert received_from - 1 <= receive_times[0] and receive_times[-1] <= received_until + 1, receive_times
    ids = [event_id for event_id, _, _, _ in stored]
    assert on_socket == ids, f"the WebSocket order {on_socket} is not the stored order {ids}"
    api_order = [event["id"] for event in events if event["type"] == "telemetry"]
    assert api_order == ids[::-1], f"the API (newest first) shows {api_order}"
    assert [event["device_ts"] for event in events if event["type"] == "telemetry"] == sent[::-1]
    with capsys.disabled():
        print(
            f"\nclocks: {len(sent)} messages with device ts from {min(sent):.0f} to {max(sent):.0f} stored in "
            f"arrival order (ids {ids[0]}..{ids[-1]}), receive times from the gateway's clock"
        )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("jump", [3600.0, -3600.0], ids=["forward", "back"])
async def test_command_deadlines_run_on_the_monotonic_clock_when_the_wall_clock_jumps(monkeypatch, jump):
    """Row: clock jumps (a real one cannot be done on a shared machine). A bridge holding a sent command with 30 s
    left expires it when its monotonic clock says so: not at once when the wall clock (``time.time`` and Django's
    ``timezone.now``) steps an hour forward, and not an hour late when it steps an hour back."""
    assert inspect.signature(CommandDispatcher).parameters["clock"].default is time.monotonic
    dispatcher, command_id, monotonic = await holding_a_sent_command(timeout=30)
    real_time, real_now = time.time, timezone.now
    monkeypatch.setattr(time, "time", lambda: real_time() + jump)
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(seconds=jump))
    await dispatcher.sweep()
    assert await command_state(command_id) == "sent", "expired at once by the jump"
    monotonic.now += 29.0
    await dispatcher.sweep()
    assert await command_state(command_id) == "sent", "expired early"
    monotonic.now += 2.0
    await dispatcher.sweep()
    assert await command_state(command_id) == "expired", "not expired when its 30 s had passed"
    await sync_to_async(connections.close_all)()  # the thread's connection, before the test database goes


@dataclass
class FakeMonotonic:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class NoBroker:
    """The publish side of an MqttClient whose broker acknowledges everything at once."""

    async def publish(self, topic: str, payload: bytes, **options: Any) -> None:
        pass


async def holding_a_sent_command(*, timeout: float) -> tuple[CommandDispatcher, str, FakeMonotonic]:
    """A dispatcher (on a fake monotonic clock) that claimed and published a fresh command of a new device."""

    @sync_to_async
    def request() -> str:
        user = get_user_model().objects.get_or_create(username="clock", defaults={"is_superuser": True})[0]
        device = Device.objects.create(id=f"clock-{uuid.uuid4().hex[:8]}", online=True)
        outcome = services.request_command(
            user=user,
            access=access_for(user),
            device_id=device.id,
            name="reboot",
            params={},
            request_id=None,
            timeout=timeout,
            offline_policy="reject",
            max_payload=65536,
        )
        return outcome.command.id

    command_id = await request()
    store = BridgeStore(auto_register=True, max_devices=100)
    monotonic = FakeMonotonic()

    async def announce(events: list[Any]) -> None:
        pass

    dispatcher = CommandDispatcher(
        owner="clock-bridge",
        store=store,
        layer=None,
        topics=Topics("clock"),
        settings=CommandSettings(lease=2),
        announce=announce,
        clock=monotonic,
    )
    claimed = await store.claim_commands(owner="clock-bridge", lease=2, limit=10, hold_offline=False)
    for command in claimed:
        await dispatcher._publish(NoBroker(), command)  # type: ignore[arg-type]
    assert await command_state(command_id) == "sent"
    return dispatcher, command_id, monotonic


@sync_to_async
def command_state(command_id: str) -> str:
    return str(Command.objects.get(id=command_id).state)
