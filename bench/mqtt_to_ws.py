#!/usr/bin/env python
"""MQTT -> gateway -> ONE WebSocket client: messages per second, latency and losses, per channel layer.

Runs, in one go, against its own Mosquitto (started here on a free port, sized for the load):

* ``aiomqtt raw``: an ``aiomqtt.Client`` subscribed to ``bench/+/telemetry`` receiving the publisher's
  messages directly (no gateway): the reference the gateway cases are compared with.
* ``memory``: ``manage.py rungateway`` (Daphne + bridge in one process, in-memory channel layer).
* ``redis``: ``daphne config.asgi:application`` and ``manage.py runbridge``, two processes joined by Redis.

Each case gets a fresh Mosquitto, a fresh SQLite database and (Redis) a flushed Redis db 14. The publisher is
a separate process (one paho client; devices ``dev-00001`` ... ``dev-01000`` under the ``bench`` prefix); the
receiver (the aiomqtt subscriber or the WebSocket client) runs in this process. See bench/README.md.

    python bench/mqtt_to_ws.py [--messages N] [--qos 0|1] [--layers memory,redis] [--quick]
                               [--rate MSG_PER_S] [--profile SECONDS] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
RESULTS_DIR = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
MOSQUITTO = "/usr/sbin/mosquitto"
REDIS_URL = "redis://127.0.0.1:6379/14"
PREFIX = "bench"
DEVICES = 1000
WARMUP = DEVICES  # one message per device, so that auto-registration happens before the measurement
IDLE_TIMEOUT = 5.0  # after publishing: stop waiting once nothing has arrived for this long
STOP_TIMEOUT = 10.0
# Environment variables the gateway reads; stripped from what we inherit so that a run is reproducible.
_GATEWAY_ENV = re.compile(r"^(GATEWAY_|MQTT_|DJANGO_|REDIS_URL$|DATABASE_URL$)")


# ----------------------------------------------------------------------------------------------------
# The publisher (a separate process: `python bench/mqtt_to_ws.py _publish ...`)
# ----------------------------------------------------------------------------------------------------

PAYLOAD = '{"ts":%.6f,"seq":%d,"n":%d,"temperature":%.2f,"humidity":%.2f,"battery":%.3f,"rssi":%d,"fw":"2.4.1"}'


def topic_for(n: int) -> str:
    return f"{PREFIX}/dev-{n % DEVICES + 1:05d}/telemetry"


def run_publisher(argv: list[str]) -> int:
    """Publish ``--count`` messages numbered from ``--first``, as fast as one paho client can; print JSON."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    parser = argparse.ArgumentParser(prog="mqtt_to_ws.py _publish")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--qos", type=int, choices=(0, 1), required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)

    window = threading.BoundedSemaphore(args.window)
    connected = threading.Event()
    outcome: dict[str, Any] = {"errors": Counter()}

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        outcome["connect"] = str(reason)
        connected.set()

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # QoS 0: the message was written to the socket; QoS 1: the broker acknowledged it.
        window.release()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(args.window)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", args.port, keepalive=60)
    client.loop_start()
    try:
        if not connected.wait(10):
            print(json.dumps({"error": "publisher could not connect"}))
            return 1
        topics = [topic_for(n) for n in range(DEVICES)]
        payload_bytes = 0
        started = time.perf_counter()
        for i in range(args.count):
            if args.rate > 0:
                delay = started + i / args.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            n = args.first + i
            payload = PAYLOAD % (
                time.time(),
                n,
                n,
                20 + n % 97 / 10,
                40 + n % 53 / 3,
                3.3 + n % 7 / 10,
                -40 - n % 50,
            )
            window.acquire()  # bounds what paho holds unsent (QoS 0) or unacknowledged (QoS 1)
            info = client.publish(topics[n % DEVICES], payload, qos=args.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                window.release()
                outcome["errors"][str(info.rc)] += 1
            payload_bytes += len(payload)
        for _ in range(args.window):  # everything written (QoS 0) or acknowledged (QoS 1)
            if not window.acquire(timeout=60):
                outcome["errors"]["drain_timeout"] += 1
                break
        elapsed = time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()
    errors = sum(outcome["errors"].values())
    print(
        json.dumps(
            {
                "published": args.count - errors,
                "errors": dict(outcome["errors"]),
                "seconds": elapsed,
                "rate": (args.count - errors) / elapsed if elapsed > 0 else 0.0,
                "mean_payload_bytes": payload_bytes / max(1, args.count),
            }
        )
    )
    return 0


async def publish(port: int, qos: int, count: int, first: int, rate: float = 0.0) -> dict[str, Any]:
    argv = [sys.executable, SCRIPT, "_publish", "--port", str(port), "--qos", str(qos)]
    argv += ["--count", str(count), "--first", str(first), "--rate", str(rate)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"publisher exited {proc.returncode}: {err.decode()[-2000:]}{out.decode()[-500:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------------------------------
# Counting what arrives
# ----------------------------------------------------------------------------------------------------


class Tally:
    """Events numbered ``first .. first+expected-1`` as they reach the receiver."""

    def __init__(self, first: int, expected: int) -> None:
        self.first_n = first
        self.expected = expected
        self.seen: set[int] = set()
        self.duplicates = 0
        self.latencies: list[float] = []
        self.frames = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.longest_gap = 0.0
        self.complete = asyncio.Event()

    def add(self, n: int, ts: float, now: float) -> None:
        if n in self.seen:
            self.duplicates += 1
            return
        self.seen.add(n)
        self.latencies.append(now - ts)
        if self.first_at is None:
            self.first_at = now
        elif self.last_at is not None:
            self.longest_gap = max(self.longest_gap, now - self.last_at)
        self.last_at = now
        if len(self.seen) >= self.expected:
            self.complete.set()

    def missing(self, limit: int = 50) -> list[int]:
        """The numbers ``n`` that never arrived (the first ``limit``)."""
        gone = (n for n in range(self.first_n, self.first_n + self.expected) if n not in self.seen)
        return [n for _, n in zip(range(limit), gone, strict=False)]

    @property
    def received(self) -> int:
        return len(self.seen)

    def rate(self) -> float:
        if self.first_at is None or self.last_at is None or self.received < 2 or self.last_at <= self.first_at:
            return 0.0
        return (self.received - 1) / (self.last_at - self.first_at)

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Receiver:
    """Routes each received message to the warm-up or the measured tally by its number ``n``."""

    def __init__(self, measured: int) -> None:
        self.warmup = Tally(0, WARMUP)
        self.measured = Tally(WARMUP, measured)
        self.unexpected: Counter[str] = Counter()
        self.last_activity = time.monotonic()

    def event(self, n: int, ts: float, now: float) -> Tally | None:
        self.last_activity = time.monotonic()
        tally = self.warmup if n < WARMUP else self.measured
        if n >= WARMUP + self.measured.expected:
            self.unexpected["n_out_of_range"] += 1
            return None
        tally.add(n, ts, now)
        return tally


@dataclass
class Watch:
    """What to watch while waiting for a gateway case: its processes, the database, and stalls."""

    procs: list[Any] = field(default_factory=list)
    database: Path | None = None
    stall_after: float = 2.5
    stalls: list[dict[str, Any]] = field(default_factory=list)
    died: list[str] = field(default_factory=list)


async def wait_delivered(
    receiver: Receiver, tally: Tally, *, cap: float, idle: float = IDLE_TIMEOUT, watch: Watch | None = None
) -> None:
    """Until ``tally`` is complete, or nothing arrived (nor was stored) for ``idle`` s, or ``cap`` s passed.

    With a ``watch``: stop at once if a gateway process exits, count progress in the database as activity
    (a slow bridge is not a lost message), and the first time nothing moves for ``stall_after`` s while more
    than 10 messages are outstanding, record a ``py-spy dump`` of the gateway processes and the stored count.
    """
    deadline = time.monotonic() + cap
    receiver.last_activity = max(receiver.last_activity, time.monotonic())
    stored, stored_at, stall_seen = None, time.monotonic(), False
    while not tally.complete.is_set():
        now = time.monotonic()
        if watch is not None:
            dead = [f"{p.name} exited {p.popen.returncode}" for p in watch.procs if not p.alive()]
            if dead:
                watch.died.extend(dead)
                return
            if watch.database is not None:
                count = await asyncio.to_thread(count_stored, watch.database)
                if count != stored:
                    stored, stored_at = count, time.monotonic()
        quiet = now - max(receiver.last_activity, stored_at)
        outstanding = tally.expected - tally.received
        if watch is not None and not stall_seen and quiet > watch.stall_after and outstanding > 10:
            stall_seen = True
            watch.stalls.append(
                {
                    "after_s": round(quiet, 1),
                    "received": tally.received,
                    "stored": stored,
                    "dumps": await asyncio.to_thread(py_spy_dumps, watch.procs),
                }
            )
        if now > deadline or quiet > idle:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.complete.wait(), 0.25)


# ----------------------------------------------------------------------------------------------------
# Processes: Mosquitto, the gateway, py-spy
# ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A child process with its output in a log file; ``stop()`` sends SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None, log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.returncode: int | None = None
        self.killed = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.popen.kill()
                self.popen.wait(5)
        self.returncode = self.popen.returncode
        self._log_file.close()

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Processes:
    """Everything started for one case, stopped in reverse order."""

    def __init__(self) -> None:
        self.items: list[Proc] = []

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None, log: Path) -> Proc:
        proc = Proc(name, argv, env=env, log=log)
        self.items.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.items):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)


def start_mosquitto(procs: Processes, workdir: Path, *, extra_config: str = "") -> int:
    """A fresh Mosquitto on a free port (``extra_config``: more lines for its configuration file)."""
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_inflight_messages 1000\n"
        "max_queued_messages 100000\n"
        "log_dest stdout\n"
        "log_type error\n"
        "log_type warning\n"
        "log_type notice\n" + extra_config
    )
    proc = procs.start("mosquitto", [MOSQUITTO, "-c", str(conf)], env=None, log=workdir / "mosquitto.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"mosquitto exited {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return port
        time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {port}:\n{proc.tail()}")


def gateway_env(*, workdir: Path, mqtt_port: int, layer: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not _GATEWAY_ENV.match(key)}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_SECRET_KEY="bench",
        GATEWAY_ENV_FILE="/nonexistent",
        DATABASE_URL=f"sqlite:///{workdir / 'bench.sqlite3'}",
        MQTT_URL=f"mqtt://127.0.0.1:{mqtt_port}",
        MQTT_PROTOCOL="5",
        GATEWAY_MQTT_CLIENT_ID=f"bench-bridge-{layer}-{uuid.uuid4().hex[:8]}",
        GATEWAY_TOPIC_PREFIX=PREFIX,
        PYTHONUNBUFFERED="1",
    )
    if layer == "redis":
        env["REDIS_URL"] = REDIS_URL
    return env


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def prepare_database(env: dict[str, str]) -> str:
    """Migrate a fresh SQLite database, create the ``bench`` operator, return a new API token."""
    manage(env, "migrate", "--no-input")
    manage(env, "create_operator", "--username", "bench")
    token = manage(env, "issue_token", "bench").strip().splitlines()[-1].strip()
    if not token or " " in token:
        raise RuntimeError(f"issue_token printed no token: {token!r}")
    return token


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    finally:
        client.close()


async def wait_ready(web_port: int, procs: list[Proc], limit: float = 60.0) -> None:
    url = f"http://127.0.0.1:{web_port}/readyz"
    deadline = time.monotonic() + limit
    last = "no answer"
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited {proc.popen.returncode} before ready:\n{proc.tail()}")
        try:
            status, body = await asyncio.to_thread(http_get, url)
            if status == 200:
                return
            last = f"{status}: {body[:300]}"
        except OSError as exc:
            last = str(exc)
        await asyncio.sleep(0.25)
    raise RuntimeError(f"/readyz not 200 after {limit:.0f} s (last: {last})")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def read_metrics(web_port: int) -> dict[str, float]:
    """The gateway_* samples of the web process's /metrics (the bridge's too in one-process mode)."""
    try:
        status, body = http_get(f"http://127.0.0.1:{web_port}/metrics")
    except OSError:
        return {}
    samples: dict[str, float] = {}
    if status != 200:
        return samples
    for line in body.splitlines():
        if not line.startswith("gateway_") or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            samples[name] = float(value)
    return samples


LOG_PROBLEM = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|\bWARNING\b|Exception|exited|lost \d+", re.IGNORECASE)


# /readyz answers 503 (an ERROR line from django.request) until the bridge's first heartbeat: expected here.
LOG_NOISE = re.compile(r"Service Unavailable: /readyz")


def log_problems(proc: Proc, limit: int = 40) -> list[str]:
    try:
        lines = proc.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:400] for line in lines if LOG_PROBLEM.search(line) and not LOG_NOISE.search(line)][:limit]


def count_stored(database: Path) -> int | None:
    """Measured messages (seq >= WARMUP) the bridge stored: tells a loss before storage from one after it."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
            return int(db.execute("SELECT COUNT(*) FROM devices_event WHERE seq >= ?", [WARMUP]).fetchone()[0])
    except sqlite3.Error as exc:
        print(f"warning: could not count stored events: {exc}", file=sys.stderr)
        return None


def py_spy_dumps(procs: list[Proc]) -> dict[str, str]:
    """``py-spy dump`` of each live process (its threads' stacks now), or why not."""
    exe = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    dumps: dict[str, str] = {}
    for proc in procs:
        if exe is None:
            dumps[proc.name] = "py-spy not installed"
            continue
        if not proc.alive():
            dumps[proc.name] = f"exited {proc.popen.returncode}"
            continue
        run = subprocess.run(
            [exe, "dump", "--pid", str(proc.pid), "--nonblocking"], capture_output=True, text=True, timeout=30
        )
        dumps[proc.name] = (run.stdout or run.stderr)[-6000:]
    return dumps


class Profiler:
    """``py-spy record`` of some processes for a while, as collapsed stacks; summarised into top functions."""

    def __init__(self, seconds: float, workdir: Path) -> None:
        self.seconds = seconds
        self.workdir = workdir
        self.runs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.exe = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")

    def start(self, targets: list[Proc]) -> None:
        if self.seconds <= 0:
            return
        if self.exe is None:
            print("warning: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
            return
        for proc in targets:
            out = self.workdir / f"pyspy-{proc.name}.txt"
            argv = [self.exe, "record", "--pid", str(proc.pid), "--duration", str(int(self.seconds))]
            argv += ["--rate", "200", "--format", "raw", "--nonblocking", "--output", str(out)]
            popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.runs.append((proc.name, popen, out))

    def finish(self) -> dict[str, Any]:
        summaries: dict[str, Any] = {}
        for name, popen, out in self.runs:
            try:
                _, err = popen.communicate(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                popen.kill()
                _, err = popen.communicate()
            if popen.returncode != 0 or not out.exists():
                summaries[name] = {"error": (err or b"").decode(errors="replace")[-500:]}
                continue
            summaries[name] = summarise_stacks(out)
            summaries[name]["file"] = str(out)
        self.runs.clear()
        return summaries


def summarise_stacks(path: Path, top: int = 15) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(frame) for frame in stack.split(";")]
        frames = [frame for frame in frames if not frame.startswith("process ") and not frame.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return {
        "samples": total,
        "self": [(frame, round(100 * count / total, 1)) for frame, count in own.most_common(top)] if total else [],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in inclusive.most_common(top * 2)] if total else [],
    }


def _short_frame(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/module.py:123)"; keep the function and the file's tail.
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    parts = Path(path).parts
    return f"{function} ({'/'.join(parts[-2:])})"


# ----------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    qos: int
    messages: int
    published_rate: float = 0.0
    delivered_rate: float = 0.0
    ratio_to_raw: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    missing: list[int] = field(default_factory=list)
    frames: int = 0
    events_per_frame: float | None = None
    warmup_received: int = 0
    stored: int | None = None  # measured messages found in the gateway's database afterwards
    publisher: dict[str, Any] = field(default_factory=dict)
    other_frames: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    log_problems: dict[str, list[str]] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    longest_gap_s: float = 0.0  # longest time between two receives in the measured phase
    stalls: list[dict[str, Any]] = field(default_factory=list)
    died: list[str] = field(default_factory=list)
    error: str | None = None

    def fill(self, receiver: Receiver, published: dict[str, Any]) -> None:
        tally = receiver.measured
        self.publisher = published
        self.published_rate = float(published.get("rate", 0.0))
        self.delivered_rate = tally.rate()
        self.p50_ms = tally.percentile_ms(0.50)
        self.p99_ms = tally.percentile_ms(0.99)
        self.max_ms = tally.percentile_ms(1.0)
        self.received = tally.received
        self.lost = tally.expected - tally.received
        self.duplicates = tally.duplicates
        self.missing = tally.missing()
        self.warmup_received = receiver.warmup.received
        self.other_frames = dict(receiver.unexpected)


def delivery_cap(messages: int) -> float:
    return 30.0 + messages / 300.0  # generous: even ~300 msg/s completes


async def measure(
    receiver: Receiver,
    port: int,
    qos: int,
    messages: int,
    rate: float,
    on_start: Any = None,
    watch: Watch | None = None,
) -> dict[str, Any]:
    """Warm up (one message per device), then publish the measured messages and wait for them to arrive."""
    warm = await publish(port, qos, WARMUP, 0)
    await wait_delivered(receiver, receiver.warmup, cap=60.0, idle=3.0, watch=watch)
    if watch is not None:
        watch.stalls.clear()  # a stall in the warm-up is the lost-message wait, not the measurement's
    if receiver.warmup.received < WARMUP:
        print(f"  warning: warm-up delivered {receiver.warmup.received}/{WARMUP}", file=sys.stderr)
    if on_start is not None:
        on_start()
    published = await publish(port, qos, messages, WARMUP, rate)
    published["warmup"] = warm
    await wait_delivered(receiver, receiver.measured, cap=delivery_cap(messages), watch=watch)
    return published


async def case_raw(args: argparse.Namespace, workdir: Path) -> CaseResult:
    import aiomqtt
    import orjson

    result = CaseResult(case=f"aiomqtt raw (qos{args.qos})", qos=args.qos, messages=args.messages)
    procs = Processes()
    try:
        port = start_mosquitto(procs, workdir)
        receiver = Receiver(args.messages)
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=f"bench-raw-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(f"{PREFIX}/+/telemetry", qos=args.qos)

            async def consume() -> None:
                async for message in client.messages:
                    now = time.time()
                    data = orjson.loads(message.payload)
                    receiver.event(data["n"], data["ts"], now)

            consumer = asyncio.create_task(consume())
            try:
                published = await measure(receiver, port, args.qos, args.messages, args.rate)
            finally:
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
        result.fill(receiver, published)
        result.events_per_frame = 1.0
        result.frames = receiver.measured.received
    finally:
        procs.stop_all()
        result.exit_codes = {proc.name: proc.returncode for proc in procs.items}
        result.log_problems = {p.name: found for p in procs.items if (found := log_problems(p))}
    return result


async def case_gateway(args: argparse.Namespace, layer: str, workdir: Path) -> CaseResult:
    import orjson
    import websockets

    result = CaseResult(case=f"{layer} (qos{args.qos})", qos=args.qos, messages=args.messages)
    procs = Processes()
    profiler = Profiler(args.profile, workdir)
    web_port = 0
    try:
        mqtt_port = start_mosquitto(procs, workdir)
        env = gateway_env(workdir=workdir, mqtt_port=mqtt_port, layer=layer)
        if layer == "redis":
            flush_redis()
        token = await asyncio.to_thread(prepare_database, env)
        web_port = free_port()
        if layer == "memory":
            web = procs.start(
                "rungateway",
                [sys.executable, "manage.py", "rungateway", "--bind", f"127.0.0.1:{web_port}"],
                env=env,
                log=workdir / "rungateway.log",
            )
            gateway = [web]
        else:
            web = procs.start(
                "daphne",
                [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(web_port), "config.asgi:application"],
                env=env,
                log=workdir / "daphne.log",
            )
            bridge = procs.start(
                "runbridge",
                [sys.executable, "manage.py", "runbridge"],
                env=env,
                log=workdir / "runbridge.log",
            )
            gateway = [web, bridge]
        await wait_ready(web_port, gateway)

        receiver = Receiver(args.messages)
        watch = Watch(procs=gateway, database=workdir / "bench.sqlite3")
        frame_counts: Counter[str] = Counter()
        uri = f"ws://127.0.0.1:{web_port}/ws/?token={token}"
        async with websockets.connect(uri, max_size=64 * 1024 * 1024, ping_interval=None, open_timeout=10) as ws:
            hello = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if hello.get("type") != "hello":
                raise RuntimeError(f"expected a hello frame, got {hello!r}")
            await ws.send(orjson.dumps({"op": "subscribe", "devices": "*"}).decode())
            answer = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if answer.get("type") != "subscribed":
                raise RuntimeError(f"expected a subscribed frame, got {answer!r}")

            async def consume() -> None:
                async for raw in ws:
                    now = time.time()
                    frame = orjson.loads(raw)
                    kind = frame.get("type")
                    if kind == "batch":
                        events = frame["events"]
                    elif kind == "telemetry":
                        events = [frame]
                    else:
                        frame_counts[str(kind)] += 1
                        receiver.unexpected[f"frame:{kind}"] += 1
                        continue
                    tally = None
                    for event in events:
                        tally = receiver.event(event["values"]["n"], event["device_ts"], now) or tally
                    if tally is not None:
                        tally.frames += 1

            consumer = asyncio.create_task(consume())
            try:
                published = await measure(
                    receiver,
                    mqtt_port,
                    args.qos,
                    args.messages,
                    args.rate,
                    on_start=lambda: profiler.start(gateway),
                    watch=watch,
                )
            finally:
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
        result.fill(receiver, published)
        result.frames = receiver.measured.frames
        if result.frames:
            result.events_per_frame = result.received / result.frames
        result.stalls = watch.stalls
        result.died = watch.died
        result.longest_gap_s = receiver.measured.longest_gap
        result.metrics = await asyncio.to_thread(read_metrics, web_port)
        result.stored = await asyncio.to_thread(count_stored, workdir / "bench.sqlite3")
        result.profile = await asyncio.to_thread(profiler.finish)
    finally:
        if profiler.runs:
            await asyncio.to_thread(profiler.finish)
        procs.stop_all()
        result.exit_codes = {proc.name: proc.returncode for proc in procs.items}
        result.log_problems = {p.name: found for p in procs.items if (found := log_problems(p))}
    return result


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------

COLUMNS = [
    ("case", "case", "<"),
    ("published msg/s", "published_rate", ">"),
    ("delivered msg/s", "delivered_rate", ">"),
    ("ratio to raw", "ratio_to_raw", ">"),
    ("p50 ms", "p50_ms", ">"),
    ("p99 ms", "p99_ms", ">"),
    ("lost", "lost", ">"),
    ("events/frame", "events_per_frame", ">"),
]


def _cell(key: str, value: Any, error: str | None) -> str:
    if error and key != "case":
        return "-"
    if value is None:
        return "-"
    if key in ("published_rate", "delivered_rate"):
        return f"{value:,.0f}"
    if key == "ratio_to_raw":
        return f"{value:.2f}"
    if key in ("p50_ms", "p99_ms"):
        return f"{value:,.1f}"
    if key == "events_per_frame":
        return f"{value:.1f}"
    return str(value)


def table(results: list[CaseResult]) -> str:
    rows = [[title for title, _, _ in COLUMNS]]
    rows += [[_cell(key, getattr(r, key), r.error) for _, key, _ in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for index, row in enumerate(rows):
        cells = [f"{cell:{align}{width}}" for cell, (_, _, align), width in zip(row, COLUMNS, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def notes(results: list[CaseResult]) -> list[str]:
    out: list[str] = []
    for r in results:
        if r.error:
            out.append(f"{r.case}: FAILED: {r.error}")
            continue
        for dead in r.died:
            out.append(f"{r.case}: {dead} DURING the measurement")
        for stall in r.stalls:
            out.append(
                f"{r.case}: stalled: nothing received or stored for {stall['after_s']} s at {stall['received']:,}"
                f" received / {stall['stored']} stored (py-spy dumps in the JSON)"
            )
        if r.longest_gap_s > 2.0:
            out.append(f"{r.case}: longest pause between two receives: {r.longest_gap_s:.1f} s")
        if r.duplicates:
            out.append(f"{r.case}: {r.duplicates} duplicate event(s)")
        if r.lost and r.stored is not None:
            out.append(
                f"{r.case}: {r.lost} lost: {r.messages - r.stored} never stored (lost between the broker and the"
                f" database), {max(0, r.stored - r.received)} stored but not delivered to the socket"
            )
        if r.missing:
            out.append(f"{r.case}: missing message numbers n (first {len(r.missing)}): {r.missing}")
        if r.warmup_received < WARMUP:
            out.append(f"{r.case}: warm-up delivered {r.warmup_received}/{WARMUP}")
        if r.other_frames:
            out.append(f"{r.case}: other frames/messages: {r.other_frames}")
        if r.publisher.get("errors"):
            out.append(f"{r.case}: publish errors (paho rc: count): {r.publisher['errors']}")
        drops = {k: v for k, v in r.metrics.items() if v and re.search(r"dropped|lost|failures|errors|retries", k)}
        if drops:
            out.append(f"{r.case}: gateway counters: {drops}")
        for name, code in r.exit_codes.items():
            if code not in (0, None, -signal.SIGTERM):
                out.append(f"{r.case}: {name} exited with {code}")
        for name, lines in r.log_problems.items():
            out.append(f"{r.case}: {len(lines)} notable line(s) in the {name} log, first: {lines[0]}")
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in (
        "django",
        "channels",
        "channels-redis",
        "daphne",
        "aiomqtt",
        "paho-mqtt",
        "websockets",
        "redis",
    ):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    with contextlib.suppress(Exception):
        found["mosquitto"] = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    with contextlib.suppress(Exception):
        found["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return found


def print_profiles(results: list[CaseResult]) -> None:
    for r in results:
        for name, summary in r.profile.items():
            if "error" in summary:
                print(f"\npy-spy {r.case} / {name}: {summary['error']}")
                continue
            print(f"\npy-spy {r.case} / {name}: {summary['samples']} samples ({summary['file']})")
            print("  self %   function")
            for frame, share in summary["self"][:12]:
                print(f"  {share:6.1f}  {frame}")


# ----------------------------------------------------------------------------------------------------


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU-s the whole machine was busy, CPU-s used by this process and its reaped children)."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # all but idle and iowait
    own = sum(getattr(os.times(), name) for name in ("user", "system", "children_user", "children_system"))
    return time.monotonic(), busy, own


def cpu_report(before: tuple[float, float, float], after: tuple[float, float, float]) -> dict[str, float]:
    wall, busy, ours = (a - b for a, b in zip(after, before, strict=True))
    others = max(0.0, busy - ours)
    capacity = wall * (os.cpu_count() or 1)
    return {
        "wall_s": round(wall, 1),
        "machine_busy_s": round(busy, 1),
        "ours_s": round(ours, 1),
        "others_s": round(others, 1),
        "others_share": round(others / capacity, 3) if capacity else 0.0,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=None, help="measured messages per case (default 20000)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--layers", default="memory,redis", help="comma-separated: memory, redis")
    parser.add_argument("--quick", action="store_true", help="3,000 messages instead of 20,000")
    parser.add_argument("--rate", type=float, default=0.0, help="pace the publisher at this msg/s (0: flat out)")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw aiomqtt reference")
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy the gateway process(es) for this long from the start of the measured phase",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = 3000 if args.quick else 20000
    if args.messages < 2:
        parser.error("--messages must be at least 2")
    args.layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    unknown = set(args.layers) - {"memory", "redis"}
    if unknown:
        parser.error(f"unknown layer(s): {', '.join(sorted(unknown))}")
    return args


async def main_async(args: argparse.Namespace, tmp: Path) -> list[CaseResult]:
    results: list[CaseResult] = []
    cases: list[tuple[str, Any]] = []
    if not args.no_raw:
        cases.append(("raw", lambda d: case_raw(args, d)))
    for layer in args.layers:
        cases.append((layer, lambda d, layer=layer: case_gateway(args, layer, d)))
    for name, run in cases:
        workdir = tmp / name
        workdir.mkdir()
        print(f"- {name}: {args.messages:,} messages at QoS {args.qos} ...", flush=True)
        started = time.monotonic()
        try:
            result = await run(workdir)
        except Exception as exc:
            result = CaseResult(case=f"{name} (qos{args.qos})", qos=args.qos, messages=args.messages)
            result.error = f"{type(exc).__name__}: {exc}"
        print(f"  done in {time.monotonic() - started:.1f} s", flush=True)
        results.append(result)
    raw = next((r for r in results if r.case.startswith("aiomqtt") and not r.error), None)
    for r in results:
        if raw is not None and raw.delivered_rate and not r.error:
            r.ratio_to_raw = r.delivered_rate / raw.delivered_rate
    return results


R = TypeVar("R")


def run_in_tempdir(
    args: argparse.Namespace,
    main_async: Callable[[argparse.Namespace, Path], Coroutine[Any, Any, R]],
    *,
    prefix: str,
) -> tuple[R, Path, float, tuple[float, float, float]]:
    """Run ``main_async(args, tmp)`` in a fresh temporary directory (removed unless ``--keep``).

    Returns its results, the directory, the start time and the machine's CPU seconds before the run."""
    cpu_before = cpu_seconds()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    started = time.monotonic()
    try:
        results = asyncio.run(main_async(args, tmp))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return results, tmp, started, cpu_before


def print_cpu_note(cpu: dict[str, Any]) -> None:
    """Say so when other processes took a noticeable share of the machine during the run."""
    if cpu["others_share"] > 0.05:
        print(
            f"note: other processes used {cpu['others_s']:.0f} CPU-s ({100 * cpu['others_share']:.0f} % of the"
            f" machine) during this run; this run used {cpu['ours_s']:.0f} CPU-s: expect noisier figures"
        )


def main(argv: list[str]) -> int:
    if argv[:1] == ["_publish"]:
        return run_publisher(argv[1:])
    args = parse_args(argv)
    results, tmp, started, cpu_before = run_in_tempdir(args, main_async, prefix="gw-bench-")
    print()
    print(
        f"MQTT -> ONE WebSocket client, QoS {args.qos}, {args.messages:,} messages of ~120 B"
        f" from {DEVICES:,} devices"
        f"{f', paced at {args.rate:,.0f} msg/s' if args.rate else ''} ({os.cpu_count()} CPUs)"
    )
    print(table(results))
    cpu = cpu_report(cpu_before, cpu_seconds())
    print_cpu_note(cpu)
    for line in notes(results):
        print(f"note: {line}")
    print_profiles(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    document = {
        "when": stamp,
        "seconds": round(time.monotonic() - started, 1),
        "args": {k: v for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "versions": versions(),
        "tmp": str(tmp) if args.keep else None,
        "results": [r.__dict__ for r in results],
        "median_latency_note": "latency = receive time - payload ts (publish time), same clock",
    }
    text = json.dumps(document, indent=2, default=str)
    (RESULTS_DIR / "latest.json").write_text(text)
    (RESULTS_DIR / f"{stamp}-qos{args.qos}.json").write_text(text)
    print(f"\nwritten: {RESULTS_DIR / 'latest.json'}  ({time.monotonic() - started:.0f} s in all)")
    if args.keep:
        print(f"kept: {tmp}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
