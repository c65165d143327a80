"""Test helpers: real services (required in CI, skipped with the reason elsewhere) and real processes."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from django.conf import settings
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_bridge.embedded_broker import broker_answers

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"

MQTT_HOST = os.environ.get("MQTT_TEST_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("MQTT_TEST_PORT", "1883"))
REDIS_TEST_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/15")
POSTGRES_TEST_URL = os.environ.get("POSTGRES_TEST_URL", "postgres://postgres@127.0.0.1:5432/test")


def require(service: str, available: bool, how_to_start: str) -> None:
    """Skip (or, under CI=true, fail) a test whose service is missing, saying how to get it."""
    if available:
        return
    message = f"{service} is not available ({how_to_start})"
    if IN_CI:
        pytest.fail(f"CI requires {message}")
    pytest.skip(message)


def require_mosquitto() -> tuple[str, int]:
    require(
        "Mosquitto",
        broker_answers(MQTT_HOST, MQTT_PORT),
        f"expected at {MQTT_HOST}:{MQTT_PORT}; start it with: mosquitto -d -c /etc/mosquitto/mosquitto.conf",
    )
    return MQTT_HOST, MQTT_PORT


def redis_available(url: str = REDIS_TEST_URL) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        return bool(client.ping())
    except Exception:
        return False


def require_redis() -> str:
    require(
        "Redis",
        redis_available(),
        f"expected at {REDIS_TEST_URL}; start it with: redis-server --daemonize yes",
    )
    return REDIS_TEST_URL


def postgres_available(url: str = POSTGRES_TEST_URL) -> bool:
    try:
        import psycopg

        psycopg.connect(url, dbname="postgres", connect_timeout=2).close()
        return True
    except Exception:
        return False


def require_postgres() -> str:
    """The PostgreSQL server URL for tests that need PostgreSQL whatever the suite's own database is."""
    require(
        "PostgreSQL",
        postgres_available(),
        f"expected at {POSTGRES_TEST_URL} (POSTGRES_TEST_URL); start it with: "
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    )
    return POSTGRES_TEST_URL


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    path = chromium_path()
    require("Chromium", path is not None, "install Debian's chromium package: apt-get install chromium")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, *, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def test_database_url() -> str:
    """A DATABASE_URL that points subprocesses at the database the test run uses."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"  # NAME is absolute, so this reads sqlite:////abs/path
    auth = f"{db['USER']}:{db['PASSWORD']}@" if db.get("USER") else ""
    return f"postgres://{auth}{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class GatewayProcess:
    """A gateway command (rungateway, runbridge, daphne ...) run as a real subprocess."""

    args: list[str]
    env: dict[str, str]
    name: str = "gateway"
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> GatewayProcess:
        log_dir = Path(os.environ.get("GATEWAY_TEST_DIR", "/tmp"))
        self.log_path = log_dir / f"{self.name}-{os.getpid()}-{time.monotonic_ns()}.log"
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def gateway_env(**overrides: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GATEWAY_", "MQTT_", "REDIS_", "DJANGO_", "DATABASE_"))
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DJANGO_SECRET_KEY": "tests-only-not-secret",
            "GATEWAY_ENV_FILE": "/nonexistent",
            "DATABASE_URL": test_database_url(),
            "GATEWAY_HEARTBEAT_INTERVAL": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def manage(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "manage.py"), *args]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running(process: GatewayProcess) -> Iterator[GatewayProcess]:
    process.start()
    try:
        yield process
    finally:
        process.kill(signal.SIGTERM)


@dataclass
class PrivateMosquitto:
    """A Mosquitto of the test's own on a free port (for tests that need its config or break it).

    With ``persistence``, sessions, their queued messages and retained messages are saved in ``directory`` when it
    stops, so they survive a ``stop()``/``start()`` (a broker restart); it then keeps the current user (as root,
    Mosquitto would switch to its own user, which cannot write a test's directory)."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    persistence: bool = False

    def start(self) -> PrivateMosquitto:
        config = self.directory / "mosquitto.conf"
        if self.persistence:
            user = pwd.getpwuid(os.geteuid()).pw_name
            persistence = f"persistence true\npersistence_location {self.directory}/\nuser {user}\n"
        else:
            persistence = "persistence false\n"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{persistence}"
            "max_inflight_messages 100\nmax_queued_messages 100000\n"
        )
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: broker_answers("127.0.0.1", self.port), timeout=10, what=f"mosquitto on {self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def mosquitto_binary() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def require_mosquitto_binary() -> str:
    path = mosquitto_binary()
    require("the mosquitto binary", Path(path).exists(), "install Debian's mosquitto package")
    return path


@dataclass
class PahoDevice:
    """A paho device that records every command and (optionally) answers, deduplicating by id like firmware."""

    port: int
    prefix: str
    device_id: str
    answer: bool = True
    ok: bool = True
    received: list[dict[str, Any]] = field(default_factory=list)
    properties: list[Any] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)
    ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> PahoDevice:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"{self.prefix}/{self.device_id}/commands/+", qos=1)
        self.client.on_subscribe = lambda *args: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.ready.wait(5)
        return self

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        payload = json.loads(message.payload)
        self.received.append({"topic": message.topic, "retain": message.retain, **payload})
        self.properties.append(message.properties)
        if not self.answer or payload["id"] in self.answered or message.retain:
            return
        self.answered.add(payload["id"])
        reply = {"id": payload["id"], "ok": self.ok, "result": {"echo": payload["params"]}}
        if not self.ok:
            reply["error"] = "jammed"
        client.publish(f"{self.prefix}/{self.device_id}/replies", json.dumps(reply), qos=1)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
