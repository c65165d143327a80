"""Reusable pieces for tests that run real processes and break them: databases, services of the test's own (so they
can be killed and restarted without touching the machine's), and readers of what a user sees (/metrics, RSS).

Not a test module: test modules import from here (and from ``tests.support``), never from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from websockets.sync.client import ClientConnection, connect

from tests.support import (
    ROOT,
    GatewayProcess,
    free_port,
    gateway_env,
    http_ok,
    manage,
    require_postgres,
    require_redis,
    wait_for,
)

T = TypeVar("T")

# --- databases ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str = "gateway_topology") -> Iterator[str]:
    """A new PostgreSQL database on ``server_url``, migrated; its DATABASE_URL. Dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, dbname="postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = urlsplit(server_url)._replace(path=f"/{name}").geturl()
    try:
        run_manage(url, "migrate", "--noinput", "-v", "0")
        yield url
    finally:
        with psycopg.connect(server_url, dbname="postgres", autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A fresh, migrated database on the machine's PostgreSQL (whatever the suite's own database is)."""
    with fresh_database(require_postgres()) as url:
        yield url


def redis_database(number: int) -> str:
    """The URL of database ``number`` on the machine's Redis (a test file's own channel layer), emptied."""
    url = urlsplit(require_redis())._replace(path=f"/{number}").geturl()
    redis.Redis.from_url(url).flushdb()
    return url


def run_manage(database_url: str, *args: str) -> str:
    done = subprocess.run(
        manage(*args), cwd=ROOT, env=gateway_env(DATABASE_URL=database_url), capture_output=True, timeout=120
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)} failed:\n{done.stdout.decode()}{done.stderr.decode()}"
    return done.stdout.decode()


def operator_token(database_url: str, username: str = "topology") -> str:
    run_manage(database_url, "create_operator", "--username", username)
    return run_manage(database_url, "issue_token", username).strip().splitlines()[-1]


def stored_event_ids(database_url: str, kind: str | None = None) -> set[int]:
    """The ids of the stored events (of ``kind`` only, when given)."""
    with psycopg.connect(database_url) as conn:
        if kind is None:
            return {row[0] for row in conn.execute("SELECT id FROM devices_event")}
        return {row[0] for row in conn.execute("SELECT id FROM devices_event WHERE kind = %s", [kind])}


# --- what a user sees ---------------------------------------------------------------------------------------------


def bridge_metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of a process's Prometheus metrics (a bridge's GATEWAY_METRICS_BIND, or a Daphne's /metrics);
    None when not served (yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return float(sample.value)
    return None


def rss_mb(process: GatewayProcess) -> float:
    """The resident set size of a gateway process, in MiB."""
    assert process.process is not None
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {process.name}")


# --- the gateway under test: one Daphne and one bridge ------------------------------------------------------------


@dataclass
class DaphneAndBridge:
    """Production on loopback: one Daphne and one ``runbridge`` (MQTT 5) on the given database, Redis and broker,
    joined by Redis; the bridge serves its metrics on ``metrics_port``. ``extra_env`` are further settings of both."""

    database_url: str
    redis_url: str
    mqtt_port: int
    prefix: str
    client_id: str = field(default_factory=lambda: f"faults-{uuid.uuid4().hex[:8]}")
    extra_env: dict[str, str] = field(default_factory=dict)
    web_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    web: GatewayProcess | None = None
    bridge: GatewayProcess | None = None
    retired: list[GatewayProcess] = field(default_factory=list)  # bridges stopped by ``restart_bridge``

    def env(self) -> dict[str, str]:
        return gateway_env(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            MQTT_URL=f"mqtt://127.0.0.1:{self.mqtt_port}",
            MQTT_PROTOCOL="5",
            GATEWAY_TOPIC_PREFIX=self.prefix,
            GATEWAY_MQTT_CLIENT_ID=self.client_id,
            GATEWAY_METRICS_BIND=f"127.0.0.1:{self.metrics_port}",
            **self.extra_env,
        )

    def start(self) -> DaphneAndBridge:
        """Start both processes (without waiting for them: see ``wait_ready``)."""
        daphne = [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(self.web_port),
            "config.asgi:application",
        ]
        self.web = GatewayProcess(daphne, self.env(), name="daphne").start()
        self.start_bridge()
        return self

    def start_bridge(self) -> None:
        self.bridge = GatewayProcess(manage("runbridge"), self.env(), name="runbridge").start()

    def restart_bridge(self) -> int | None:
        """SIGTERM the bridge (it stores and acknowledges its batch, then exits) and start a new one; the old exit
        status."""
        assert self.bridge is not None
        status = self.bridge.kill(signal.SIGTERM)
        self.retired.append(self.bridge)
        self.start_bridge()
        return status

    def processes(self) -> list[GatewayProcess]:
        return [process for process in (self.web, self.bridge) if process is not None]

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample of the bridge's metrics; None while they are not served."""
        return bridge_metric(self.metrics_port, name, **labels)

    def bridge_count(self, name: str, **labels: str) -> float:
        """A sample of the bridge's metrics; 0 while they are not served."""
        return self.metric(name, **labels) or 0.0

    def web_count(self, name: str, **labels: str) -> float:
        """A sample of Daphne's /metrics; 0 while they are not served."""
        return bridge_metric(self.web_port, name, **labels) or 0.0

    def connected(self) -> bool:
        return self.metric("gateway_mqtt_connected") == 1

    def disconnected(self) -> bool:
        return self.metric("gateway_mqtt_connected") == 0

    def wait_ready(self) -> None:
        """Until Daphne answers /readyz with 200 and the bridge is connected (a process that exits fails it)."""

        def ready() -> bool:
            assert all(process.alive() for process in self.processes()), self.logs()
            return http_ok(f"http://127.0.0.1:{self.web_port}/readyz") and self.connected()

        wait_for(ready, timeout=30, interval=0.2, what="Daphne ready and the bridge connected")

    def rss(self) -> tuple[float, float]:
        """Daphne's and the bridge's RSS, in MiB."""
        assert self.web is not None and self.bridge is not None
        return rss_mb(self.web), rss_mb(self.bridge)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for process in self.processes():
            process.kill(sig)

    def logs(self) -> str:
        every = [*self.retired, *self.processes()]
        return "\n".join(f"--- {process.name}\n{process.log()[-6000:]}" for process in every)


# --- a watching browser (WebSocket client) ---------------------------------------------------------------------


class Watcher(threading.Thread):
    """A token client subscribed to every device, recording every event frame it receives (and when).

    Telemetry is keyed by (device, ``v``): frames carry no ``seq``, so publishers repeat it as the value ``v``.
    ``complete_at`` is when the ``expect``-th distinct telemetry message arrived (0: not counted)."""

    def __init__(self, port: int, token: str, expect: int = 0) -> None:
        super().__init__(name=f"ws-{port}", daemon=True)
        self.ws: ClientConnection = connect(f"ws://127.0.0.1:{port}/ws/?token={token}", max_size=2**24)
        assert json.loads(self.ws.recv(timeout=10))["type"] == "hello"
        self.ws.send(json.dumps({"op": "subscribe", "devices": "*"}))
        assert json.loads(self.ws.recv(timeout=10)) == {"type": "subscribed", "devices": "*"}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.ids: list[int] = []
        self.telemetry: Counter[tuple[str, int]] = Counter()
        self.commands: list[tuple[float, dict[str, Any]]] = []
        self.online: set[str] = set()
        self.other: list[dict[str, Any]] = []  # frames that are not events: gap, error
        self.expect = expect
        self.complete_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._closing.is_set():
                with contextlib.suppress(TimeoutError):
                    frame = json.loads(self.ws.recv(timeout=0.2))
                    with self._lock:
                        for event in frame["events"] if frame["type"] == "batch" else [frame]:
                            self._record(event)
        except BaseException as exc:
            if not self._closing.is_set():
                self.error = exc

    def _record(self, event: dict[str, Any]) -> None:
        if "id" not in event:
            self.other.append(event)
            return
        self.ids.append(event["id"])
        if event["type"] == "telemetry":
            self.telemetry[(event["device"], int(event["values"]["v"]))] += 1  # frames carry no seq: v repeats it
            if len(self.telemetry) == self.expect and not self.complete_at:
                self.complete_at = time.monotonic()
        elif event["type"] == "command":
            self.commands.append((time.monotonic(), event))
        elif event["type"] == "status" and event["online"]:
            self.online.add(event["device"])

    def received_ids(self) -> list[int]:
        with self._lock:
            return list(self.ids)

    def telemetry_seen(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self.telemetry)

    def command_states(self, command_id: str) -> list[tuple[str, float]]:
        """The command's states in id order (the order clients apply them in), each with when it arrived."""
        with self._lock:
            frames = sorted((e["id"], e["state"], at) for at, e in self.commands if e["command_id"] == command_id)
        return [(state, at) for _, state, at in frames]

    def state_of(self, command_id: str) -> str | None:
        states = self.command_states(command_id)
        return states[-1][0] if states else None

    def first_command_id(self) -> str | None:
        with self._lock:
            return self.commands[0][1]["command_id"] if self.commands else None

    def check(self, name: str, expected: set[tuple[str, int]]) -> None:
        """Every expected (device, seq) exactly once and nothing else, no duplicate id, no gap or error frame."""
        assert self.error is None, f"client {name} failed: {self.error!r}"
        assert self.other == [], f"client {name} got gap or error frames: {self.other[:5]}"
        ids = self.received_ids()
        assert len(ids) == len(set(ids)), f"client {name} got duplicate ids: {duplicates(ids)}"
        assert set(self.telemetry) == expected, f"client {name}: {len(expected - set(self.telemetry))} missing"
        assert max(self.telemetry.values()) == 1, f"client {name}: a (device, seq) twice"

    def close(self) -> None:
        self._closing.set()
        self.ws.close()
        self.join(5)


@contextlib.contextmanager
def watching(port: int, token: str, expect: int = 0) -> Iterator[Watcher]:
    watcher = Watcher(port, token, expect)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.close()


def duplicates(ids: list[int]) -> list[int]:
    return sorted(id_ for id_, count in Counter(ids).items() if count > 1)[:10]


def descents(ids: list[int]) -> int:
    """How often an id arrived at or below the one before it."""
    return sum(1 for before, after in itertools.pairwise(ids) if after <= before)


# --- services of the test's own -----------------------------------------------------------------------------------


@dataclass
class PrivateRedis:
    """A redis-server of the test's own on a free port, without persistence, so a restart empties it."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, timeout=10, what=f"redis-server on {self.port}")
        return self

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """Stop it the hard way (a crash: clients see their connections reset)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (trust auth, user postgres, no fsync) that a test can stop and start.

    ``initdb`` costs a few seconds: create one per module or session and ``stop``/``start`` it in the cases.
    Its files live in a temporary directory owned by the postgres user; ``remove`` stops it and deletes them.
    """

    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gateway-pg-")))

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, timeout=timeout)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout.decode()}{done.stderr.decode()}"

    def init(self) -> PrivatePostgres:
        shutil.chown(self.directory, "postgres", "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        return self

    def start(self) -> None:
        """Start it (nothing to do when it already answers)."""
        if self.answers():
            return
        log = self.directory / "server.log"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "-t", "30", "start")
        wait_for(self.answers, timeout=15, what=f"PostgreSQL on {self.port}")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash as clients see it: every connection dropped, no checkpoint."""
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def answers(self) -> bool:
        try:
            psycopg.connect(self.url, connect_timeout=1).close()
            return True
        except psycopg.Error:
            return False

    def remove(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def seconds_since(moment: float) -> float:
    return time.monotonic() - moment


# --- a network that misbehaves ------------------------------------------------------------------------------------


@dataclass
class _Link:
    """One proxied connection: the two writers (client side, target side) and the two tasks copying between them."""

    writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter]
    pumps: list[asyncio.Task[None]]


class TcpProxy:
    """A TCP proxy on loopback in front of ``target_port``, on an event loop of its own thread.

    ``stall()`` turns every open connection half-open as both ends see it: nothing more is forwarded either way, yet
    both sockets stay open (no FIN, no RST), like a NAT or firewall that forgot the flow. Only the ends' own timers
    (MQTT keepalive, a receive watchdog) can notice. Connections made after it are forwarded normally.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.accepted = 0
        self._links: list[_Link] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{self.port}", daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stall(self) -> int:
        """Stop forwarding on every open connection, leaving its sockets open; returns how many were stalled."""
        return self._call(self._stall())

    def cut(self) -> int:
        """Close every open connection at both ends, stalled or not (each end sees the other close); returns how
        many. New connections are still forwarded."""
        return self._call(self._cut())

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        pumps = [
            asyncio.create_task(self._pump(client_reader, target_writer)),
            asyncio.create_task(self._pump(target_reader, client_writer)),
        ]
        self._links.append(_Link((client_writer, target_writer), pumps))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; when its source closes, close the other side (a cancelled pump closes nothing)."""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _stall(self) -> int:
        stalled = [link for link in self._links if not any(pump.done() for pump in link.pumps)]
        for link in stalled:
            for pump in link.pumps:
                pump.cancel()
        return len(stalled)

    async def _cut(self) -> int:
        links, self._links = self._links, []
        open_links = [link for link in links if not all(writer.is_closing() for writer in link.writers)]
        for link in links:
            for pump in link.pumps:
                pump.cancel()
            for writer in link.writers:
                writer.close()
        return len(open_links)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()


# --- systemd's end of a Type=notify service -------------------------------------------------------------------------


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket collecting what the service sends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append((time.monotonic(), self._sock.recv(65536).decode()))
            except (TimeoutError, BlockingIOError):
                return [text for _, text in self.messages]

    def wait_for(self, line: str, timeout: float = 20) -> str:
        def found() -> str | None:
            return next((text for text in self.poll() if line in text.splitlines()), None)

        return wait_for(found, timeout=timeout, what=f"{line!r} on NOTIFY_SOCKET")

    def close(self) -> None:
        self._sock.close()
