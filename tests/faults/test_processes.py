"""The reliability matrix, process faults (issue 8): Daphne and the bridge killed, blocked and stopped for real.

Each case runs the production processes (``daphne config.asgi:application``, ``manage.py runbridge``) on a fresh
PostgreSQL database, Redis (db 13) and a private Mosquitto, and breaks one of them at a precise point without any
hook in the gateway:

- a TCP proxy between the bridge and the broker (``HoldingProxy``) can hold either direction, so the bridge can be
  killed after its PUBLISH or PUBACK was written but before the broker (or the bridge) got it;
- the test can take the PostgreSQL advisory lock every writer of events takes (``lock_event_ids``), so the bridge
  waits inside an ingest transaction, a batch in hand, for as long as the test wants;
- SIGSTOP freezes the bridge between two observable states;
- the bridge's log goes to a pipe the test stops reading, so the event loop blocks in ``write()`` as it would on a
  stuck journal, while the process and its other threads stay alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import psycopg
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from devices.services import EVENT_ID_LOCK
from gateway.events import GROUP_EXPIRY
from tests.faults.harness import (
    NotifySocket,
    bridge_metric,
    fresh_postgres_database,
    operator_token,
    redis_database,
    stored_event_ids,
)
from tests.support import (
    ROOT,
    GatewayProcess,
    PahoDevice,
    PrivateMosquitto,
    free_port,
    gateway_env,
    http_ok,
    manage,
    require_mosquitto_binary,
    wait_for,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

P = TypeVar("P", bound=GatewayProcess)

REDIS_DB = 13  # this module's own database on the machine's Redis
COMMAND_LEASE = 2.0  # seconds a claim lasts (GATEWAY_COMMAND_LEASE): how long a crashed claim blocks a command
BRIDGE_UNIT = ROOT / "deploy" / "systemd" / "gateway-bridge@.service"


# --- a proxy whose directions can be held -------------------------------------------------------------------------


class HoldingProxy:
    """A TCP proxy from the bridge to the broker. ``hold("up")`` stops forwarding what the bridge sends (its
    PUBLISHes and PUBACKs stay in the proxy), ``hold("down")`` what the broker sends; ``sever()`` closes every
    connection and drops what was held, as if the bridge had died before those bytes left it. (The harness's
    ``TcpProxy`` stalls both directions and keeps the connections open: a different fault.)"""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = {"up": threading.Event(), "down": threading.Event()}
        self.release()
        self._lock = threading.Lock()
        self._connections: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def hold(self, direction: str) -> None:
        self._open[direction].clear()

    def release(self) -> None:
        for gate in self._open.values():
            gate.set()

    def sever(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for client, upstream, severed in connections:
            severed.set()
            close(client, upstream)

    def close(self) -> None:
        self.sever()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            severed = threading.Event()
            with self._lock:
                self._connections.append((client, upstream, severed))
            for source, target, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump, args=(source, target, self._open[direction], severed), daemon=True
                ).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, gate: threading.Event, severed: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                while not gate.wait(0.02):
                    if severed.is_set():
                        return  # held bytes are dropped, never forwarded
                if severed.is_set():
                    return
                target.sendall(data)
        except OSError:
            pass
        severed.set()
        close(source, target)


def close(*sockets: socket.socket) -> None:
    """Shut down, then close: a thread blocked in ``recv`` on the socket returns, and the peer sees the end."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


# --- the rig: broker, proxy, database, Redis and the gateway processes --------------------------------------------


@dataclass
class Rig:
    """One case's world. Bridges reach the broker through the proxy with one client id, so a restarted bridge
    resumes its predecessor's persistent session (MQTT 5, clean start off, session expiry 3,600 s)."""

    database_url: str
    redis_url: str
    broker: PrivateMosquitto
    proxy: HoldingProxy
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    processes: list[GatewayProcess] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"f3-{self.run}/devices"

    def env(self, **extra: str) -> dict[str, str]:
        return gateway_env(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            MQTT_URL=f"mqtt://127.0.0.1:{self.proxy.port}",
            MQTT_PROTOCOL="5",
            GATEWAY_TOPIC_PREFIX=self.prefix,
            GATEWAY_MQTT_CLIENT_ID=f"f3-bridge-{self.run}",
            GATEWAY_COMMAND_LEASE=str(COMMAND_LEASE),
            GATEWAY_COMMAND_POLL_INTERVAL="0.2",
            **extra,
        )

    def daphne(self, port: int) -> GatewayProcess:
        args = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"]
        return self.started(GatewayProcess(args, self.env(), name="daphne"))

    def bridge_env(self, metrics_port: int, **extra: str) -> dict[str, str]:
        return self.env(GATEWAY_METRICS_BIND=f"127.0.0.1:{metrics_port}", **extra)

    def bridge(self, metrics_port: int, **extra: str) -> GatewayProcess:
        return self.started(
            GatewayProcess(manage("runbridge"), self.bridge_env(metrics_port, **extra), name="runbridge")
        )

    def started(self, process: P) -> P:
        """Start ``process``; it is killed when the case ends, whatever happens."""
        self.processes.append(process)
        process.start()
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.kill()

    def logs(self) -> str:
        return "\n".join(
            f"--- {process.name} {process.args[-1]}\n{process.log()[-6000:]}" for process in self.processes
        )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    require_mosquitto_binary()
    redis_url = redis_database(REDIS_DB)
    broker = PrivateMosquitto(free_port(), tmp_path).start()
    proxy = HoldingProxy(broker.port)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(broker.stop)
        cleanup.callback(proxy.close)
        database_url = cleanup.enter_context(fresh_postgres_database())
        world = Rig(database_url, redis_url, broker, proxy)
        cleanup.callback(world.stop)
        yield world


def wait_bridge_connected(rig: Rig, bridge: GatewayProcess, metrics_port: int, timeout: float = 30) -> None:
    def connected() -> bool:
        assert bridge.alive(), f"the bridge exited:\n{rig.logs()}"
        return bridge_metric(metrics_port, "gateway_mqtt_connected") == 1

    wait_for(connected, timeout=timeout, interval=0.1, what="the bridge connected to the broker")


def wait_daphne_ready(rig: Rig, daphne: GatewayProcess, port: int, timeout: float = 30) -> None:
    def ready() -> bool:
        assert daphne.alive(), f"Daphne exited:\n{rig.logs()}"
        return http_ok(f"http://127.0.0.1:{port}/readyz")

    wait_for(ready, timeout=timeout, interval=0.1, what=f"Daphne on {port} ready")


# --- the database, as the test reads (and locks) it ---------------------------------------------------------------


def stored_telemetry(database_url: str) -> Counter[tuple[str, int]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT device_id, seq FROM devices_event WHERE kind = 'telemetry'").fetchall()
    return Counter((device, seq) for device, seq in rows)


def command_row(database_url: str, command_id: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(
            "SELECT state, attempts, sent_at, lease_owner FROM devices_command WHERE id = %s", [command_id]
        )
        row = cursor.fetchone()
    assert row is not None, f"no command {command_id}"
    return dict(zip(("state", "attempts", "sent_at", "lease_owner"), row, strict=True))


@contextlib.contextmanager
def event_id_lock(database_url: str) -> Iterator[Callable[[], bool]]:
    """Hold the lock every ingest transaction takes first: a bridge's next batch waits inside its transaction
    until the block ends. Yields a check that some transaction is waiting for it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", [EVENT_ID_LOCK])

        def someone_waits() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).fetchone()
            return bool(row and row[0])

        try:
            yield someone_waits
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [EVENT_ID_LOCK])


# --- devices ------------------------------------------------------------------------------------------------------


def mqtt_client(port: int, name: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


class Telemetry(threading.Thread):
    """``devices`` devices publishing ``seq`` 1..``per_device`` each at QoS 1, paced at ``rate`` messages per
    second, straight to the broker (the devices' side is not what breaks). ``v`` repeats ``seq``, because event
    frames do not carry it."""

    def __init__(self, port: int, prefix: str, device_ids: list[str], per_device: int, rate: float) -> None:
        super().__init__(name="telemetry", daemon=True)
        self._port = port
        self._prefix = prefix
        self.device_ids = device_ids
        self.per_device = per_device
        self._rate = rate
        self.sent = 0
        self.error: BaseException | None = None

    @property
    def total(self) -> int:
        return len(self.device_ids) * self.per_device

    def expected(self) -> set[tuple[str, int]]:
        return {(device, seq) for device in self.device_ids for seq in range(1, self.per_device + 1)}

    def run(self) -> None:
        client = mqtt_client(self._port, "f3-telemetry")
        try:
            infos = []
            started = time.monotonic()
            for seq in range(1, self.per_device + 1):
                for device in self.device_ids:
                    due = started + self.sent / self._rate
                    if due > time.monotonic():
                        time.sleep(due - time.monotonic())
                    info = client.publish(f"{self._prefix}/{device}/telemetry", f'{{"seq":{seq},"v":{seq}}}', qos=1)
                    assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
                    infos.append(info)
                    self.sent += 1
            for info in infos:
                info.wait_for_publish(30)
                assert info.is_published(), f"message {info.mid} not acknowledged by the broker"
        except BaseException as exc:
            self.error = exc
        finally:
            client.disconnect()
            client.loop_stop()

    def finish(self, timeout: float = 60) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the devices did not finish publishing"
        assert self.error is None, f"the devices failed: {self.error!r}"


def publish_once(port: int, topic: str, payload: str, *, retain: bool = False) -> None:
    client = mqtt_client(port, "f3-once")
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


# --- a WebSocket client that reconnects and resumes ---------------------------------------------------------------


class ResumingClient:
    """A token client subscribed to every device. After its socket drops it reconnects (to any Daphne) and
    subscribes with ``after`` = the highest id it has applied, as the protocol tells clients to (section 9.4)."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._lock = threading.Lock()
        self.events: list[tuple[int, float]] = []  # (id, when it arrived)
        self.telemetry: Counter[tuple[str, int]] = Counter()
        self.commands: list[dict[str, Any]] = []
        self.online: set[str] = set()
        self.other: list[dict[str, Any]] = []  # gap and error frames
        self.ws: ClientConnection | None = None
        self.dropped = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def last_id(self) -> int:
        with self._lock:
            return max((id_ for id_, _ in self.events), default=0)

    def connect(self, port: int) -> None:
        self.dropped.clear()
        ws = connect(f"ws://127.0.0.1:{port}/ws/?token={self._token}", max_size=2**24, open_timeout=10)
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.send(json.dumps({"op": "subscribe", "devices": "*", "after": self.last_id}))
        self.ws = ws
        self._reader = threading.Thread(target=self._read, args=(ws,), name=f"ws-{port}", daemon=True)
        self._reader.start()

    def _read(self, ws: ClientConnection) -> None:
        try:
            for text in ws:
                frame = json.loads(text)
                with self._lock:
                    for event in frame["events"] if frame["type"] == "batch" else [frame]:
                        self._record(event)
        except (ConnectionClosed, OSError):
            pass
        self.dropped.set()

    def _record(self, event: dict[str, Any]) -> None:
        if event["type"] in ("hello", "subscribed", "pong"):
            return
        if "id" not in event:
            self.other.append(event)
            return
        self.events.append((event["id"], time.monotonic()))
        if event["type"] == "telemetry":
            self.telemetry[(event["device"], int(event["values"]["v"]))] += 1
        elif event["type"] == "command":
            self.commands.append(event)
        elif event["type"] == "status" and event["online"]:
            self.online.add(event["device"])

    def ids(self) -> list[int]:
        with self._lock:
            return [id_ for id_, _ in self.events]

    def received_at_least(self, count: int) -> bool:
        with self._lock:
            return len(self.events) >= count

    def first_event_after(self, moment: float) -> float | None:
        with self._lock:
            return next((at for _, at in self.events if at > moment), None)

    def command_states(self, request_id: str) -> list[str]:
        """The states of the command sent with ``request_id``, in id order."""
        with self._lock:
            frames = sorted((e["id"], e["state"]) for e in self.commands if e.get("request_id") == request_id)
        return [state for _, state in frames]

    def command_id(self, request_id: str) -> str | None:
        with self._lock:
            return next((e["command_id"] for e in self.commands if e.get("request_id") == request_id), None)

    def send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        self.ws.send(json.dumps(frame))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self._reader is not None:
            self._reader.join(5)


def assert_exactly_once_in_order(client: ResumingClient, expected: set[tuple[str, int]], database_url: str) -> None:
    ids = client.ids()
    assert client.other == [], f"gap or error frames: {client.other[:5]}"
    assert all(before < after for before, after in itertools.pairwise(ids)), "an id twice or out of order"
    assert set(client.telemetry) == expected, f"{len(expected - set(client.telemetry))} (device, seq) missing"
    assert max(client.telemetry.values()) == 1, "a (device, seq) delivered twice"
    assert set(ids) == stored_event_ids(database_url), "the client's ids differ from the stored ones"


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


# --- Daphne killed ------------------------------------------------------------------------------------------------


def test_clients_of_a_killed_daphne_resume_elsewhere_with_no_gap_and_no_duplicate(rig: Rig, capsys):
    """Row "Daphne killed with SIGKILL": a client whose Daphne is SIGKILLed mid-stream reconnects to the second
    Daphne and subscribes ``after`` its last id; then that one is killed and the client goes back to the first,
    restarted. It ends with every stored event exactly once, in strictly increasing id order, no gap frame; the dead
    processes' memberships of the events group expire after ``GROUP_EXPIRY``."""
    ports = [free_port(), free_port()]
    metrics_port = free_port()
    daphnes = [rig.daphne(port) for port in ports]
    bridge = rig.bridge(metrics_port)
    token = operator_token(rig.database_url)
    wait_bridge_connected(rig, bridge, metrics_port)
    for daphne, port in zip(daphnes, ports, strict=True):
        wait_daphne_ready(rig, daphne, port)

    client = ResumingClient(token)
    client.connect(ports[0])
    devices = Telemetry(rig.broker.port, rig.prefix, [f"w{n:02d}" for n in range(20)], per_device=100, rate=150)
    devices.start()
    recoveries = []
    try:
        for killed, survivor in ((0, 1), (1, 0)):
            flowing = functools.partial(client.received_at_least, len(client.ids()) + 150)
            wait_for(flowing, timeout=20, what="150 more events on the client")
            killed_at = time.monotonic()
            daphnes[killed].kill(signal.SIGKILL)
            assert client.dropped.wait(5), "the client did not notice its Daphne died"
            reconnected_at = time.monotonic()
            client.connect(ports[survivor])
            resumed = functools.partial(client.first_event_after, reconnected_at)
            first = wait_for(resumed, timeout=10, what="events on the new socket")
            recoveries.append(first - killed_at)
            if killed == 0:
                daphnes[0] = rig.daphne(ports[0])  # systemd's Restart=always
                wait_daphne_ready(rig, daphnes[0], ports[0])
        devices.finish()
        wait_for(lambda: set(client.telemetry) == devices.expected(), timeout=20, what="every message on the client")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the client has {len(client.telemetry)}\n{rig.logs()}") from None
    finally:
        client.close()
    assert_exactly_once_in_order(client, devices.expected(), rig.database_url)
    # The killed Daphnes' hubs never left the events group: every batch is queued for them in Redis until their
    # membership expires, so the layer's group expiry must be short (the group's TTL shows it; Channels' is a day).
    events_group_ttl = redis.Redis.from_url(rig.redis_url).ttl("asgi:group:gateway.events")
    assert 0 < events_group_ttl <= GROUP_EXPIRY, f"the events group lives {events_group_ttl} s"
    report(
        capsys,
        f"Daphne SIGKILL: {devices.total} messages, 2 kills; first event on the new socket "
        f"{', '.join(f'{r:.2f}' for r in recoveries)} s after each kill; nothing lost, nothing twice",
    )


# --- the bridge killed in the middle of its work ------------------------------------------------------------------


def test_a_bridge_killed_mid_batch_loses_nothing_and_stores_nothing_twice(rig: Rig, capsys):
    """Row "bridge killed with SIGKILL in the middle of an ingest batch": with devices publishing (with ``seq``),
    the bridge stores batches whose PUBACKs the proxy holds (stored, never acknowledged), then waits inside the
    next batch's transaction (the test holds the event-id lock), and is SIGKILLed there. The restarted bridge
    resumes the session: the broker redelivers both; the stored ones are recognised by ``seq`` and skipped
    (``gateway_ingest_skipped_total{reason="duplicate_seq"}``), the others stored. A live WebSocket client sees
    every (device, seq) once."""
    web_port, metrics_port = free_port(), free_port()
    daphne = rig.daphne(web_port)
    bridge = rig.bridge(metrics_port)
    token = operator_token(rig.database_url)
    wait_bridge_connected(rig, bridge, metrics_port)
    wait_daphne_ready(rig, daphne, web_port)
    client = ResumingClient(token)
    client.connect(web_port)
    devices = Telemetry(rig.broker.port, rig.prefix, [f"b{n:02d}" for n in range(20)], per_device=80, rate=250)
    devices.start()
    try:
        wait_for(lambda: sum(stored_telemetry(rig.database_url).values()) >= 300, timeout=20, what="batches stored")
        rig.proxy.hold("up")
        held_from = sum(stored_telemetry(rig.database_url).values())
        wait_for(
            lambda: sum(stored_telemetry(rig.database_url).values()) >= held_from + 50,
            timeout=10,
            what="batches stored whose PUBACKs are held",
        )
        with event_id_lock(rig.database_url) as someone_waits:
            wait_for(someone_waits, timeout=10, what="the next batch waiting inside its transaction")
            stored_unacked = sum(stored_telemetry(rig.database_url).values()) - held_from
            killed_at = time.monotonic()
            assert bridge.kill(signal.SIGKILL) == -signal.SIGKILL
            rig.proxy.sever()
        rig.proxy.release()
        bridge = rig.bridge(metrics_port)
        wait_bridge_connected(rig, bridge, metrics_port)
        connected_after = time.monotonic() - killed_at
        devices.finish()
        wait_for(lambda: set(client.telemetry) == devices.expected(), timeout=30, what="every message on the client")
        caught_up_after = time.monotonic() - killed_at
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the client has {len(client.telemetry)}\n{rig.logs()}") from None
    finally:
        client.close()
    stored = stored_telemetry(rig.database_url)
    assert set(stored) == devices.expected() and max(stored.values()) == 1, "each (device, seq) stored once"
    assert_exactly_once_in_order(client, devices.expected(), rig.database_url)
    skipped = bridge_metric(metrics_port, "gateway_ingest_skipped_total", reason="duplicate_seq") or 0
    assert skipped >= stored_unacked, f"{stored_unacked} stored but unacknowledged, {skipped} redeliveries skipped"
    report(
        capsys,
        f"bridge SIGKILL mid-batch: {devices.total} messages; {stored_unacked} stored but unacknowledged at the kill "
        f"(redelivered, {skipped:.0f} skipped by seq); new bridge connected {connected_after:.1f} s after the kill "
        f"(restarted at once); client complete {caught_up_after:.1f} s after it; nothing lost, nothing twice",
    )


@dataclass(frozen=True)
class KillPoint:
    """Where a command's life is cut (``step``, reached by ``reach``), and when its device answers."""

    step: str  # stored, claimed, published (the PUBACK lost), sent
    reply: str  # "at once": the device answers each id on receipt; "after the kill": while no bridge runs;
    # "to the second copy": the device is slow, and answers only once it got the command again; "never"
    publishes: range  # how many copies of the command the device may receive
    final: str = "succeeded"
    timeout: float = 30.0  # the command's timeout (seconds)

    @property
    def name(self) -> str:
        return f"{self.step}, answered {self.reply}"

    @property
    def device_id(self) -> str:
        return f"k-{KILL_POINTS.index(self)}"


FINAL_STATES = {"succeeded", "failed", "expired", "rejected"}
KILL_POINTS = [
    KillPoint("stored", "at once", publishes=range(1, 2)),
    KillPoint("claimed", "at once", publishes=range(1, 2)),
    # The redelivered reply usually finishes it before the claim lapses; on a slow restart it is published again.
    KillPoint("published", "at once", publishes=range(1, 3)),
    KillPoint("published", "to the second copy", publishes=range(2, 3)),  # the claim lapses: published again
    KillPoint("sent", "after the kill", publishes=range(1, 2)),
    # The deadline was on the dead bridge's clock: the next one sweeps it by wall clock, one lease late.
    KillPoint("sent", "never", publishes=range(1, 2), final="expired", timeout=2.0),
]


def send_command(client: ResumingClient, point: KillPoint) -> str:
    """Ask for a command through Daphne (``request_id`` = the point's name); its id, from the ``pending`` frame."""
    frame = {"op": "command", "device": point.device_id, "name": "reboot", "request_id": point.name}
    client.send({**frame, "timeout": point.timeout, "params": {"step": point.step}})
    return str(wait_for(functools.partial(client.command_id, point.name), timeout=10, what="the pending frame"))


def copies(device: PahoDevice) -> list[str]:
    """The ids of the commands the device received, one per copy."""
    return [command["id"] for command in device.received]


def copied(device: PahoDevice, times: int) -> bool:
    return len(copies(device)) >= times


def reach(point: KillPoint, rig: Rig, bridge: GatewayProcess, client: ResumingClient, device: PahoDevice) -> str:
    """Send a command and stop the bridge at ``point.step``; returns the command's id. None needs a hook:

    - stored: SIGSTOP the bridge first, so the web side stores the command (pending, attempts 0) and nobody claims
      it;
    - claimed: hold what the bridge sends; it claims the command (lease, attempts 1) but its PUBLISH stays in the
      proxy and never reaches the broker;
    - published: hold what the broker sends; the PUBLISH reaches the device (observed there) but the PUBACK never
      reaches the bridge, so ``sent`` is not recorded;
    - sent: wait for the database to say ``sent``.
    """
    assert bridge.process is not None
    if point.step == "stored":
        os.kill(bridge.process.pid, signal.SIGSTOP)
    elif point.step == "claimed":
        rig.proxy.hold("up")
    elif point.step == "published":
        rig.proxy.hold("down")
    command_id = send_command(client, point)
    if point.step == "published":
        wait_for(lambda: command_id in copies(device), timeout=10, what="the device's copy")
    reached: dict[str, Callable[[dict[str, Any]], bool]] = {
        "stored": lambda row: row["state"] == "pending" and row["attempts"] == 0,
        "claimed": lambda row: row["state"] == "pending" and row["attempts"] == 1 and bool(row["lease_owner"]),
        "published": lambda row: row["state"] == "pending" and row["attempts"] == 1 and row["sent_at"] is None,
        "sent": lambda row: row["state"] == "sent",
    }
    wait_for(
        lambda: reached[point.step](command_row(rig.database_url, command_id)),
        timeout=10,
        what=f"the command {point.step}",
    )
    if point.step == "claimed":
        time.sleep(0.3)  # time for the PUBLISH to reach the proxy (held there), not the broker
        assert copies(device) == [], "the held PUBLISH reached the device"
    return command_id


def reply(rig: Rig, device: PahoDevice, command_id: str) -> None:
    """The device's answer, published by the test (for a device that does not answer at once)."""
    answer = {"id": command_id, "ok": True, "result": {"late": True}}
    publish_once(rig.broker.port, f"{rig.prefix}/{device.device_id}/replies", json.dumps(answer))


def test_a_command_cut_at_each_step_by_a_killed_bridge_ends_in_one_final_state(rig: Rig, capsys):
    """Row "bridge killed with SIGKILL at each step of a command": at each point (stored; claimed; published but
    its PUBACK lost, so not recorded ``sent``, once with a device that answers at once and once with one that
    answers late; ``sent``, answered while no bridge runs or never) the bridge is SIGKILLed and a new one started
    on the same session. The command ends ``succeeded`` (``expired`` when never answered) with exactly one
    final-state frame on a WebSocket client. The device receives it once, except after a lost PUBACK with no reply
    yet: then once more when the claim lapses, with the same id."""
    web_port, metrics_port = free_port(), free_port()
    daphne = rig.daphne(web_port)
    bridge = rig.bridge(metrics_port)
    token = operator_token(rig.database_url)
    devices = [
        PahoDevice(rig.broker.port, rig.prefix, point.device_id, answer=point.reply == "at once").start()
        for point in KILL_POINTS
    ]
    wait_bridge_connected(rig, bridge, metrics_port)
    wait_daphne_ready(rig, daphne, web_port)
    client = ResumingClient(token)
    client.connect(web_port)
    for device in devices:
        publish_once(rig.broker.port, f"{rig.prefix}/{device.device_id}/status", "online", retain=True)
    wait_for(lambda: len(client.online) == len(devices), timeout=10, what="the devices online")
    outcomes = []
    try:
        for point, device in zip(KILL_POINTS, devices, strict=True):
            command_id = reach(point, rig, bridge, client, device)
            killed_at = time.monotonic()
            assert bridge.kill(signal.SIGKILL) == -signal.SIGKILL
            rig.proxy.sever()
            rig.proxy.release()
            if point.reply == "after the kill":
                reply(rig, device, command_id)
            bridge = rig.bridge(metrics_port)
            if point.reply == "to the second copy":
                second_copy = functools.partial(copied, device, 2)
                wait_for(second_copy, timeout=COMMAND_LEASE + 15, what="the second copy")
                reply(rig, device, command_id)
            final = wait_for(
                functools.partial(command_finished, client, point.name), timeout=20, what=f"{point.name}: finished"
            )
            states = client.command_states(point.name)
            received = copies(device)
            outcomes.append(f"{point.name}: {final - killed_at:.1f} s, {len(received)} cop(ies)")
            assert states[0] == "pending" and states[-1] == point.final, f"{point.name}: states {states}"
            assert states.count(point.final) == 1 and set(states) <= {"pending", "sent", point.final}, states
            assert len(received) in point.publishes, f"{point.name}: the device got {received}"
            assert set(received) == {command_id}, f"{point.name}: the device got {received}"
            assert command_row(rig.database_url, command_id)["state"] == point.final
            wait_bridge_connected(rig, bridge, metrics_port)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    finally:
        client.close()
        for device in devices:
            device.stop()
    report(capsys, "command kill points (kill -> final state on the client): " + "; ".join(outcomes))


def command_finished(client: ResumingClient, request_id: str) -> float | None:
    """When the client had the command's final state (None before)."""
    states = client.command_states(request_id)
    return time.monotonic() if states and states[-1] in FINAL_STATES else None


# --- the bridge's event loop blocked --------------------------------------------------------------------------------

WATCHDOG_USEC = 1_000_000  # WatchdogSec=1s: keep-alives every 0.5 s (the unit says 30 s; the path is the same)


@dataclass
class LogPipeProcess(GatewayProcess):
    """A gateway process whose log (stdout and stderr) goes into a 4 KiB pipe the test drains. Once the test stops
    reading (``reading.clear()``) and the pipe is full, the process blocks in its next log write, in whichever
    thread logs: for the bridge, the event loop. Its other threads (the metrics listener) keep running."""

    reading: threading.Event = field(default_factory=threading.Event)
    output: bytearray = field(default_factory=bytearray)

    def start(self) -> LogPipeProcess:
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        self.reading.set()
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=write_end, stderr=write_end, start_new_session=True
        )
        os.close(write_end)
        threading.Thread(target=self._drain, args=(read_end,), name="log-pipe", daemon=True).start()
        return self

    def _drain(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while self.reading.wait() and (chunk := pipe.read(4096)):
                self.output += chunk

    def log(self) -> str:
        return self.output.decode(errors="replace")


def last_ping(notify: NotifySocket) -> float:
    notify.poll()
    return max((at for at, text in notify.messages if "WATCHDOG=1" in text.splitlines()), default=0.0)


def test_a_blocked_event_loop_misses_its_watchdog_and_the_restarted_bridge_loses_nothing(rig: Rig, tmp_path, capsys):
    """Row "bridge's event loop blocked": the test plays systemd on a real NOTIFY_SOCKET with WatchdogSec=1s. The
    bridge's log pipe stops being read and bad input makes the loop log until ``write()`` blocks (a stuck journal:
    no hook in the gateway, and unlike SIGSTOP only the loop stops). The keep-alives stop while the process lives
    on and still serves /metrics from its own thread, so only the watchdog can tell; the test then does what
    systemd does (SIGABRT, start again): the new bridge says READY=1 and pings again, and the telemetry that came
    during the block is stored once."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    watchdog = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    metrics_port = free_port()
    bridge = rig.started(
        LogPipeProcess(manage("runbridge"), rig.bridge_env(metrics_port, **watchdog), name="runbridge")
    )
    try:
        notify.wait_for("READY=1")
        wait_bridge_connected(rig, bridge, metrics_port)
        notify.wait_for("WATCHDOG=1")

        bridge.reading.clear()
        blocked_at = time.monotonic()
        client = mqtt_client(rig.broker.port, "f3-bad-input")
        for number in range(300):  # one log line per device (lines about bad input are limited per device)
            client.publish(f"{rig.prefix}/bad-{number:03d}/telemetry", b"not json", qos=1)
        valid = [client.publish(f"{rig.prefix}/v-{n}/telemetry", f'{{"seq":1,"v":{n}}}', qos=1) for n in range(20)]
        for info in valid:
            info.wait_for_publish(5)
        client.disconnect()
        client.loop_stop()

        timeout = WATCHDOG_USEC / 1e6
        wait_for(lambda: time.monotonic() - last_ping(notify) > timeout, timeout=15, what="the keep-alives to stop")
        pinged_last = last_ping(notify)
        missed_at = pinged_last + timeout  # when systemd's watchdog fires
        assert bridge.alive(), "the bridge died instead of hanging"
        assert bridge_metric(metrics_port, "gateway_mqtt_connected") == 1, "its metrics thread should still answer"
        assert not stored_telemetry(rig.database_url), "a blocked loop stored something"

        aborted_at = time.monotonic()
        assert bridge.kill(signal.SIGABRT) == -signal.SIGABRT  # systemd's WatchdogSignal, then Restart=always
        bridge.reading.set()
        notify.messages.clear()
        restarted = rig.bridge(metrics_port, **watchdog)
        ready = notify.wait_for("READY=1")
        assert restarted.process is not None and f"MAINPID={restarted.process.pid}" in ready.splitlines()
        notify.wait_for("WATCHDOG=1")
        expected = {(f"v-{n}", 1) for n in range(20)}
        wait_for(lambda: set(stored_telemetry(rig.database_url)) == expected, timeout=15, what="the telemetry")
        recovered_after = time.monotonic() - missed_at
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    finally:
        notify.close()
    assert max(stored_telemetry(rig.database_url).values()) == 1
    report(
        capsys,
        f"blocked loop: no keep-alive after the block began (last one {blocked_at - pinged_last:.2f} s before); "
        f"aborted {aborted_at - blocked_at:.1f} s into the block (watchdog 1 s); "
        f"the restarted bridge stored the telemetry sent during the block {recovered_after:.1f} s after the "
        "watchdog fired, once",
    )


# --- SIGTERM ------------------------------------------------------------------------------------------------------


def stop_timeout() -> float:
    """The bridge unit's TimeoutStopSec: how long systemd waits after SIGTERM before it kills."""
    found = re.search(r"^TimeoutStopSec=(\d+)s$", BRIDGE_UNIT.read_text(), re.MULTILINE)
    assert found, f"no TimeoutStopSec in {BRIDGE_UNIT}"
    return float(found.group(1))


def publishing_bridge(
    rig: Rig, metrics_port: int, *, names: str, per_device: int, stored_first: int, **env: str
) -> tuple[GatewayProcess, Telemetry]:
    """A bridge (with ``env``) that 10 devices publish to, once it has stored ``stored_first`` messages."""
    bridge = rig.bridge(metrics_port, **env)
    wait_bridge_connected(rig, bridge, metrics_port)
    devices = Telemetry(rig.broker.port, rig.prefix, [f"{names}{n:02d}" for n in range(10)], per_device, rate=200)
    devices.start()
    wait_for(
        lambda: sum(stored_telemetry(rig.database_url).values()) >= stored_first, timeout=20, what="batches stored"
    )
    return bridge, devices


def stored_by_the_next_bridge(rig: Rig, metrics_port: int, devices: Telemetry) -> GatewayProcess:
    """Start the stopped bridge's successor and wait until every message the devices sent is stored."""
    bridge = rig.bridge(metrics_port)
    wait_bridge_connected(rig, bridge, metrics_port)
    devices.finish()
    wait_for(lambda: set(stored_telemetry(rig.database_url)) == devices.expected(), timeout=30, what="every message")
    return bridge


def test_sigterm_stores_and_acknowledges_the_batch_in_hand_and_exits_0_in_time(rig: Rig, tmp_path, capsys):
    """Row "SIGTERM": while devices publish, the bridge's next batch waits inside its transaction (the test holds
    the event-id lock) and it gets SIGTERM: it says STOPPING=1, keeps the batch until the database answers,
    stores and acknowledges it, and exits 0 well within the unit's TimeoutStopSec. The next bridge gets no stored
    message redelivered (``duplicate_seq`` stays 0) and everything is stored once."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    metrics_port = free_port()
    try:
        bridge, devices = publishing_bridge(
            rig, metrics_port, names="s", per_device=60, stored_first=100, NOTIFY_SOCKET=notify.path
        )
        assert bridge.process is not None
        with event_id_lock(rig.database_url) as someone_waits:
            wait_for(someone_waits, timeout=10, what="a batch waiting inside its transaction")
            before = sum(stored_telemetry(rig.database_url).values())
            terminated_at = time.monotonic()
            bridge.process.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1", timeout=5)
            time.sleep(1.0)
            assert bridge.alive(), "the bridge left before storing the batch in hand"
        released_at = time.monotonic()
        code = bridge.process.wait(timeout=stop_timeout())
        stopped_after = time.monotonic() - terminated_at
        exit_after_release = time.monotonic() - released_at
        assert code == 0, f"exit status {code}"
        flushed = sum(stored_telemetry(rig.database_url).values()) - before
        assert flushed > 0, "the batch in hand was not stored"
        stored_by_the_next_bridge(rig, metrics_port, devices)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    finally:
        notify.close()
    assert max(stored_telemetry(rig.database_url).values()) == 1
    redelivered = bridge_metric(metrics_port, "gateway_ingest_skipped_total", reason="duplicate_seq") or 0
    assert redelivered == 0, f"{redelivered} stored messages were redelivered: the flushed batch was not acknowledged"
    report(
        capsys,
        f"SIGTERM: exit 0 {stopped_after:.2f} s after the signal, {exit_after_release:.2f} s after the database "
        f"answered (the test held it 1 s; "
        f"TimeoutStopSec {stop_timeout():.0f} s); batch in hand ({flushed} messages) stored and acknowledged",
    )


def test_sigterm_with_the_database_stuck_gives_up_at_the_stop_timeout_and_loses_nothing(rig: Rig, capsys):
    """Row "SIGTERM", when the batch cannot be stored: the database does not answer (the test holds the event-id
    lock throughout), so after ``GATEWAY_STOP_TIMEOUT`` (1 s here, 20 s by default, below TimeoutStopSec) the bridge
    exits with status 1 instead of waiting to be killed; the next bridge gets the unacknowledged batch redelivered
    and everything is stored once."""
    metrics_port = free_port()
    try:
        bridge, devices = publishing_bridge(
            rig, metrics_port, names="t", per_device=30, stored_first=50, GATEWAY_STOP_TIMEOUT="1"
        )
        assert bridge.process is not None
        with event_id_lock(rig.database_url) as someone_waits:
            wait_for(someone_waits, timeout=10, what="a batch waiting inside its transaction")
            terminated_at = time.monotonic()
            bridge.process.send_signal(signal.SIGTERM)
            code = bridge.process.wait(timeout=10)
            stopped_after = time.monotonic() - terminated_at
        assert code == 1, f"exit status {code}"
        assert "did not stop within 1 s" in bridge.log()
        stored_by_the_next_bridge(rig, metrics_port, devices)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    assert max(stored_telemetry(rig.database_url).values()) == 1
    assert stopped_after < 5, f"exited {stopped_after:.2f} s after the signal"
    report(capsys, f"SIGTERM, database stuck: exit 1 {stopped_after:.2f} s after the signal (stop timeout 1 s)")
