#!/usr/bin/env python
"""MQTT -> gateway -> WebSocket clients: messages per second, latency and losses, per channel layer.

Runs, in one go, against its own Mosquitto (started here on a free port, sized and set up as deployed):

* ``aiomqtt raw``: an ``aiomqtt.Client`` subscribed to ``bench/+/telemetry`` receiving the publisher's
  messages directly (no gateway): the reference the gateway cases are compared with.
* ``memory``: ``manage.py rungateway`` (Daphne + bridge in one process, in-memory channel layer).
* ``redis``: ``daphne config.asgi:application`` and ``manage.py runbridge``, two processes joined by Redis.

Each case gets a fresh Mosquitto, a fresh SQLite database and (Redis) a flushed Redis db 14. The publisher is
a separate process (one paho client; devices ``dev-00001`` ... ``dev-01000`` under the ``bench`` prefix); the
receivers (the aiomqtt subscriber, or the WebSocket clients: one by default, ``--clients N`` each subscribed to
every device, or ``--watchers M`` each subscribed to one of M devices) run in this process. After the flat-out
measurement, ``--rates`` and ``--at`` add paced measurements with the same gateway and clients. See
bench/README.md.

    python bench/mqtt_to_ws.py [--messages N] [--qos 0|1] [--layers memory,redis] [--quick]
                               [--clients N | --watchers M] [--rates 0.25,0.5,0.9] [--at MSG_PER_S ...]
                               [--phase-seconds S] [--rate MSG_PER_S] [--profile SECONDS [--profile-phase N]]
                               [--nodelay on|off] [--rows FILE] [--gateway-env NAME=VALUE ...] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime as dt
import functools
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
RESULTS_DIR = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
MOSQUITTO = "/usr/sbin/mosquitto"
REDIS_URL = "redis://127.0.0.1:6379/14"
LAYERS = ("memory", "redis")  # the channel layers a gateway case runs on: --layers
PREFIX = "bench"
DEVICES = 1000
WARMUP = DEVICES  # one message per device, so that auto-registration happens before the measurement
TARGET = (50, 1000.0, 50.0)  # the target: with 50 clients, at 1,000 msg/s, p99 under 50 ms
RECEIVER_BUSY = 0.8  # note a phase during which the receiving process used more than this share of a core
RECEIVER_LATE_MS = 20.0  # ... or its event loop ran later than this at p99 (a machine short of CPU)
PHASE_MIN_MESSAGES = 2000  # messages in a paced phase: at least this many, else --phase-seconds' worth
# The gateway's per-socket abuse limit on client frames (20/s by default) is not what this measures; the clients
# here send one subscribe frame each, but a benchmark must not depend on staying under it. The slow-client bounds
# (GATEWAY_WS_QUEUE_MAX, GATEWAY_WS_STALL_TIMEOUT) stay as deployed: see the README.
BENCH_GATEWAY_ENV = {"GATEWAY_WS_FRAMES_PER_SECOND": "1000000"}
IDLE_TIMEOUT = 5.0  # after publishing: stop waiting once nothing has arrived for this long
STOP_TIMEOUT = 10.0
# Environment variables the gateway reads; stripped from what we inherit so that a run is reproducible.
_GATEWAY_ENV = re.compile(r"^(GATEWAY_|MQTT_|DJANGO_|REDIS_URL$|DATABASE_URL$)")


# ----------------------------------------------------------------------------------------------------
# The publisher (a separate process: `python bench/mqtt_to_ws.py _publish ...`)
# ----------------------------------------------------------------------------------------------------

PAYLOAD = '{"ts":%.6f,"seq":%d,"n":%d,"temperature":%.2f,"humidity":%.2f,"battery":%.3f,"rssi":%d,"fw":"2.4.1"}'


def device_for(n: int, devices: int = DEVICES) -> str:
    """The device that message number ``n`` comes from: the devices take turns."""
    return f"dev-{n % devices + 1:05d}"


def topic_for(n: int, devices: int = DEVICES) -> str:
    return f"{PREFIX}/{device_for(n, devices)}/telemetry"


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
    parser.add_argument("--devices", type=int, default=DEVICES)
    parser.add_argument("--nodelay", action="store_true", help="TCP_NODELAY on the publisher's socket")
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
    if args.nodelay:
        # One connection stands in for many devices: Nagle's algorithm must not hold one's message for another's.
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    try:
        if not connected.wait(10):
            print(json.dumps({"error": "publisher could not connect"}))
            return 1
        topics = [topic_for(n, args.devices) for n in range(args.devices)]
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
            info = client.publish(topics[n % args.devices], payload, qos=args.qos)
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


async def publish(
    port: int, qos: int, count: int, first: int, rate: float = 0.0, devices: int = DEVICES, *, nodelay: bool = False
) -> dict[str, Any]:
    """Run the publisher process: ``count`` messages numbered from ``first``, from ``devices`` devices in turn
    (message ``n`` from ``dev-{n % devices + 1}``), flat out or paced at ``rate`` msg/s."""
    argv = [sys.executable, SCRIPT, "_publish", "--port", str(port), "--qos", str(qos)]
    argv += ["--count", str(count), "--first", str(first), "--rate", str(rate), "--devices", str(devices)]
    argv += ["--nodelay"] if nodelay else []
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
    """Events numbered ``first .. first+expected-1`` (or exactly those of ``numbers``) as they reach one receiver."""

    def __init__(self, first: int, expected: int, *, numbers: range | None = None) -> None:
        self.numbers = range(first, first + expected) if numbers is None else numbers
        self.first_n = self.numbers.start
        self.expected = len(self.numbers)
        self.seen: set[int] = set()
        self.duplicates = 0
        self.latencies: list[float] = []
        self.frames = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.longest_gap = 0.0
        self.complete = asyncio.Event()
        if self.expected == 0:
            self.complete.set()

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
        gone = (n for n in self.numbers if n not in self.seen)
        return [n for _, n in zip(range(limit), gone, strict=False)]

    @property
    def received(self) -> int:
        return len(self.seen)

    def rate(self) -> float:
        if self.first_at is None or self.last_at is None or self.received < 2 or self.last_at <= self.first_at:
            return 0.0
        return (self.received - 1) / (self.last_at - self.first_at)

    def percentile_ms(self, q: float) -> float | None:
        return percentile_ms(sorted(self.latencies), q)


def percentile_ms(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted latencies (seconds), in milliseconds."""
    if not ordered:
        return None
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Receiver:
    """Routes each received message to the warm-up or the measured tally by its number ``n``."""

    def __init__(self, measured: int, *, warmup: int = WARMUP) -> None:
        self.warmup = Tally(0, warmup)
        self.measured = Tally(warmup, measured)
        self.unexpected: Counter[str] = Counter()
        self.last_activity = time.monotonic()

    def event(self, n: int, ts: float, now: float) -> Tally | None:
        self.last_activity = time.monotonic()
        tally = self.warmup if n < self.warmup.expected else self.measured
        if n >= self.warmup.expected + self.measured.expected:
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


class Progress:
    """What ``wait_for`` watches: one tally of one receiver (subclassed for the WebSocket clients' phases)."""

    def __init__(self, receiver: Receiver, tally: Tally) -> None:
        self.receiver = receiver
        self.tally = tally

    def complete(self) -> bool:
        return self.tally.complete.is_set()

    def outstanding(self) -> int:
        return self.tally.expected - self.tally.received

    def received(self) -> int:
        return self.tally.received

    def last_activity(self) -> float:
        return self.receiver.last_activity

    def numbers(self) -> range:
        return self.tally.numbers

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.tally.complete.wait(), seconds)


async def wait_delivered(
    receiver: Receiver, tally: Tally, *, cap: float, idle: float = IDLE_TIMEOUT, watch: Watch | None = None
) -> None:
    """Until ``tally`` is complete, or nothing arrived (nor was stored) for ``idle`` s, or ``cap`` s passed."""
    receiver.last_activity = max(receiver.last_activity, time.monotonic())
    await wait_for(Progress(receiver, tally), cap=cap, idle=idle, watch=watch)


async def wait_for(progress: Progress, *, cap: float, idle: float = IDLE_TIMEOUT, watch: Watch | None = None) -> None:
    """Until ``progress`` is complete, or nothing arrived (nor was stored) for ``idle`` s, or ``cap`` s passed.

    With a ``watch``: stop at once if a gateway process exits, count progress in the database as activity
    (a slow bridge is not a lost message), and the first time nothing moves for ``stall_after`` s while more
    than 10 messages are outstanding, record a ``py-spy dump`` of the gateway processes and the stored count.
    """
    deadline = time.monotonic() + cap
    started = time.monotonic()
    numbers = progress.numbers()
    stored, stored_at, stall_seen = None, time.monotonic(), False
    while not progress.complete():
        now = time.monotonic()
        if watch is not None:
            dead = [f"{p.name} exited {p.popen.returncode}" for p in watch.procs if not p.alive()]
            if dead:
                watch.died.extend(dead)
                return
            if watch.database is not None:
                count = await asyncio.to_thread(count_stored, watch.database, numbers.start, numbers.stop)
                if count != stored:
                    stored, stored_at = count, time.monotonic()
        quiet = now - max(progress.last_activity(), stored_at, started)
        outstanding = progress.outstanding()
        if watch is not None and not stall_seen and quiet > watch.stall_after and outstanding > 10:
            stall_seen = True
            watch.stalls.append(
                {
                    "after_s": round(quiet, 1),
                    "received": progress.received(),
                    "stored": stored,
                    "dumps": await asyncio.to_thread(py_spy_dumps, watch.procs),
                }
            )
        if now > deadline or quiet > idle:
            return
        await progress.wait(0.25)


# ----------------------------------------------------------------------------------------------------
# WebSocket clients: many sockets in this process, each frame stored as received and parsed after its phase
# ----------------------------------------------------------------------------------------------------

EVENT_MARK = b'"type":"telemetry"'  # once per telemetry event, in a batch frame or a single one
EVENT_FRAME_STARTS = (b'{"type":"batch"', b'{"type":"telemetry"')
CONNECT_CONCURRENCY = 20  # sockets being opened at once (Daphne's handshake timeout is 5 s)


class WsClient(asyncio.Protocol):
    """One WebSocket client on websockets' sans-I/O protocol, driven straight from ``data_received``.

    No task, queue or decoding per frame: an event frame (``batch`` or a single ``telemetry``) is kept as bytes
    with the time the chunk that completed it was read from the socket, and its events are counted with
    ``bytes.count``. ``settle`` parses the kept frames later, outside the measured window. Other frames (``hello``,
    ``subscribed``, ``error``, ``gap``, ...) are parsed at once and queued for ``next_control``. Pings are answered
    by the protocol itself (its pong goes out with ``data_to_send``)."""

    def __init__(self, uri: str, index: int) -> None:
        from websockets.client import ClientProtocol
        from websockets.frames import Frame, Opcode
        from websockets.uri import parse_uri

        self._frame_type, self._data_opcodes, self._close = (
            Frame,
            (Opcode.TEXT, Opcode.BINARY, Opcode.CONT),
            Opcode.CLOSE,
        )
        self.index = index
        self.ws = ClientProtocol(parse_uri(uri), max_size=64 * 1024 * 1024)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.control: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pending: list[tuple[float, bytes]] = []
        self.events = 0  # telemetry events in the event frames received so far (duplicates included)
        self.frame_kinds: Counter[str] = Counter()  # frames other than event frames, by type
        self.last_activity = time.monotonic()
        self.closed: str | None = None
        self._fragments: list[bytes] = []

    # --- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.last_activity = time.monotonic()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if not isinstance(event, self._frame_type):  # the handshake's response
                if not self.opened.done():
                    if self.ws.handshake_exc is not None:
                        self.opened.set_exception(self.ws.handshake_exc)
                    else:
                        self.opened.set_result(None)
                continue
            if event.opcode in self._data_opcodes:
                if not event.fin:
                    self._fragments.append(bytes(event.data))
                    continue
                message = bytes(event.data)
                if self._fragments:
                    message = b"".join([*self._fragments, message])
                    self._fragments.clear()
                self._message(message, now)
            elif event.opcode is self._close:
                self.closed = f"closed by the gateway: code {self.ws.close_code} {self.ws.close_reason!r}"
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            self.closed = f"connection lost: {exc!r}" if exc else "connection closed"
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(self.closed))
        self.control.put_nowait({"type": "_closed", "why": self.closed})

    # --- frames -------------------------------------------------------------------------------------------

    def _message(self, message: bytes, now: float) -> None:
        if message.startswith(EVENT_FRAME_STARTS):
            self.pending.append((now, message))
            self.events += message.count(EVENT_MARK)
            return
        import orjson

        frame = orjson.loads(message)
        self.frame_kinds[str(frame.get("type"))] += 1
        self.control.put_nowait(frame)

    def _flush(self) -> None:
        if self.transport is None:
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def send(self, frame: dict[str, Any]) -> None:
        import orjson

        self.ws.send_text(orjson.dumps(frame))
        self._flush()

    async def next_control(self, within: float = 10.0) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.control.get(), within)
        if frame.get("type") == "_closed":
            raise ConnectionError(frame["why"])
        return frame

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.ws.send_close(1000)
                self._flush()
            self.transport.close()


async def open_client(host: str, port: int, token: str, index: int, devices: list[str] | None) -> WsClient:
    """Connect, read ``hello``, subscribe to ``devices`` (``None``: ``"*"``) and wait for ``subscribed``."""
    loop = asyncio.get_running_loop()
    uri = f"ws://{host}:{port}/ws/?token={token}"
    _, client = await loop.create_connection(lambda: WsClient(uri, index), host, port)
    try:
        await asyncio.wait_for(client.opened, 10)
        hello = await client.next_control()
        if hello.get("type") != "hello":
            raise RuntimeError(f"expected a hello frame, got {hello!r}")
        client.send({"op": "subscribe", "devices": "*" if devices is None else devices})
        while True:
            answer = await client.next_control()
            if answer.get("type") == "subscribed":
                break
            if answer.get("type") == "error":
                raise RuntimeError(f"client {index}: subscribe refused: {answer!r}")
            raise RuntimeError(f"client {index}: expected a subscribed frame, got {answer!r}")
        wanted = "*" if devices is None else sorted(devices)
        if answer.get("devices") != wanted:
            raise RuntimeError(f"client {index}: subscribed to {answer.get('devices')!r}, not {wanted!r}")
    except BaseException:
        client.close()
        raise
    return client


async def open_clients(host: str, port: int, token: str, subscriptions: list[list[str] | None]) -> list[WsClient]:
    """One client per entry of ``subscriptions``, at most ``CONNECT_CONCURRENCY`` being opened at once."""
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(index: int, devices: list[str] | None) -> WsClient:
        async with limit:
            return await open_client(host, port, token, index, devices)

    tasks = [asyncio.create_task(one(i, devices)) for i, devices in enumerate(subscriptions)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                (await task).close()
        raise


@dataclass
class Phase:
    """One published run of messages (``first`` .. ``first+count-1``) and what each client should get of it."""

    label: str
    first: int
    count: int
    target: float  # the publisher's pace, msg/s (0: flat out)
    tallies: list[Tally]
    raw_start: list[int]  # each client's event count when the phase started

    @property
    def end(self) -> int:
        return self.first + self.count


class Audience:
    """The WebSocket clients of a case, and the phases published to them.

    ``watchers`` = 0: every client is subscribed to every device and expects every message. Otherwise client
    ``k`` is subscribed to ``dev-{k+1}`` only, the publisher uses exactly ``watchers`` devices, and client ``k``
    expects the messages ``n`` with ``n % watchers == k``."""

    def __init__(self, clients: list[WsClient], *, watchers: int = 0) -> None:
        self.clients = clients
        self.watchers = watchers
        self.phases: list[Phase] = []
        self.unexpected: Counter[str] = Counter()
        self.parse_seconds = 0.0  # CPU time settle() took: what parsing as frames arrive would have added

    def numbers_for(self, index: int, first: int, count: int) -> range:
        if not self.watchers:
            return range(first, first + count)
        return range(first + (index - first) % self.watchers, first + count, self.watchers)

    def add_phase(self, label: str, first: int, count: int, target: float = 0.0) -> Phase:
        if self.phases and first < self.phases[-1].end:
            raise ValueError("phases must be numbered in increasing order without overlap")
        phase = Phase(
            label=label,
            first=first,
            count=count,
            target=target,
            tallies=[Tally(0, 0, numbers=self.numbers_for(c.index, first, count)) for c in self.clients],
            raw_start=[c.events for c in self.clients],
        )
        self.phases.append(phase)
        return phase

    def _phase_of(self, n: int, firsts: list[int]) -> Phase | None:
        index = bisect.bisect_right(firsts, n) - 1
        if index < 0 or n >= self.phases[index].end:
            return None
        return self.phases[index]

    def settle(self) -> None:
        """Parse the event frames every client kept, into the tallies of their phases."""
        import orjson

        started = time.process_time()
        firsts = [phase.first for phase in self.phases]
        for client in self.clients:
            pending, client.pending = client.pending, []
            for now, raw in pending:
                frame = orjson.loads(raw)
                events = frame["events"] if frame.get("type") == "batch" else [frame]
                tally: Tally | None = None
                for event in events:
                    if event.get("type") != "telemetry":
                        self.unexpected[f"event:{event.get('type')}"] += 1
                        continue
                    n = event["values"]["n"]
                    phase = self._phase_of(n, firsts)
                    if phase is None:
                        self.unexpected["n_out_of_range"] += 1
                        continue
                    found = phase.tallies[client.index]
                    if n not in found.numbers:
                        self.unexpected["not_subscribed_device"] += 1
                        continue
                    found.add(n, event["device_ts"], now)
                    tally = found
                if tally is not None:
                    tally.frames += 1
        self.parse_seconds += time.process_time() - started

    def close(self) -> None:
        for client in self.clients:
            client.close()


class PhaseProgress(Progress):
    """A phase is complete when every client has its expected events: counted cheaply from the raw frames
    first; only then are the frames parsed (``settle``) to count distinct messages."""

    def __init__(self, audience: Audience, phase: Phase) -> None:
        self.audience = audience
        self.phase = phase

    def _raw(self) -> list[int]:
        return [c.events - start for c, start in zip(self.audience.clients, self.phase.raw_start, strict=True)]

    def complete(self) -> bool:
        raw = self._raw()
        if any(got < tally.expected for got, tally in zip(raw, self.phase.tallies, strict=True)):
            return False
        self.audience.settle()
        return all(tally.complete.is_set() for tally in self.phase.tallies)

    def outstanding(self) -> int:
        raw = self._raw()
        return sum(max(0, t.expected - got) for got, t in zip(raw, self.phase.tallies, strict=True))

    def received(self) -> int:
        return sum(self._raw())

    def last_activity(self) -> float:
        return max(client.last_activity for client in self.audience.clients)

    def numbers(self) -> range:
        return range(self.phase.first, self.phase.end)

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(min(seconds, 0.1))


class LoopMonitor:
    """Samples this process's CPU time and its event loop's lateness every 10 ms: how busy the receiving side
    was, and how late it could have read a frame (what that adds to the measured latency), over any window."""

    PERIOD = 0.01

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), process CPU s, lateness s)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.PERIOD)
            late = time.monotonic() - before - self.PERIOD
            self.samples.append((time.time(), time.process_time(), max(0.0, late)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def window(self, start: float | None, end: float | None) -> dict[str, float]:
        """CPU share (of one core) and lateness (p99, max, ms) between two ``time.time()`` instants."""
        if start is None or end is None or end <= start:
            return {}
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        wall = inside[-1][0] - inside[0][0]
        late = sorted(s[2] for s in inside)
        return {
            "cpu_share": round((inside[-1][1] - inside[0][1]) / wall, 3) if wall > 0 else 0.0,
            "late_p99_ms": round(1000 * late[min(len(late) - 1, int(0.99 * len(late)))], 1),
            "late_max_ms": round(1000 * late[-1], 1),
        }


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


def redis_url(db: int) -> str:
    return f"redis://127.0.0.1:6379/{db}"


def flush_redis(url: str = REDIS_URL) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def flush_redis_db(db: int) -> None:
    """Flush Redis db ``db`` (the ``--redis-db`` of command_rtt.py, idle_ws.py and ingest.py)."""
    flush_redis(redis_url(db))


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


def count_stored(database: Path, first: int = WARMUP, end: int | None = None) -> int | None:
    """Messages numbered ``first`` (default: the measured ones, seq >= WARMUP) to ``end`` (excluded) that the
    bridge stored: tells a loss before storage from one after it."""
    import sqlite3

    query = "SELECT COUNT(*) FROM devices_event WHERE seq >= ?" + ("" if end is None else " AND seq < ?")
    params = [first] if end is None else [first, end]
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
            return int(db.execute(query, params).fetchone()[0])
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

    def start(self, targets: list[Proc], tag: str = "") -> None:
        if self.seconds <= 0:
            return
        if self.exe is None:
            print("warning: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
            return
        for proc in targets:
            out = self.workdir / f"pyspy-{proc.name}{tag}.txt".replace(" ", "-")
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
    # WebSocket clients and phases (see Audience): one result per phase of a case
    layer: str = ""
    audience: str = ""  # "1 client", "50 clients", "200 one-device clients" ("" for the raw reference)
    phase: str = "flat out"
    phase_index: int = 0  # 0: the first measurement of the case (flat out unless --rate), then the paced ones
    target_rate: float = 0.0  # the publisher's pace, msg/s (0: flat out)
    clients: int = 1
    watchers: int = 0
    warmup_expected: int = WARMUP
    median_client_rate: float | None = None  # all-device clients: the median client's msg/s
    total_rate: float | None = None  # deliveries/s summed over the clients
    lost_worst: int | None = None  # the client that missed most
    clients_short: int = 0  # clients that missed at least one message
    receiver: dict[str, float] = field(default_factory=dict)  # this process while receiving (LoopMonitor.window)
    metrics_delta: dict[str, float] = field(default_factory=dict)  # gateway counters that moved in this phase
    remarks: list[str] = field(default_factory=list)  # more notes
    per_client: list[dict[str, Any]] = field(default_factory=list)  # rate, received, expected, p99 of each client

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

    def fill_phase(self, audience: Audience, phase: Phase, published: dict[str, Any]) -> None:
        """The figures of one phase over all clients: rates (see the README), latency percentiles over every
        delivery, losses per client."""
        tallies = phase.tallies
        self.publisher = published
        self.published_rate = float(published.get("rate", 0.0))
        self.target_rate = phase.target
        rates = sorted(tally.rate() for tally in tallies)
        self.total_rate = sum(rates) if len(tallies) > 1 else None
        if audience.watchers:
            # Each message goes to one client: the figure is all clients' deliveries over the phase's window.
            firsts = [t.first_at for t in tallies if t.first_at is not None]
            lasts = [t.last_at for t in tallies if t.last_at is not None]
            received = sum(t.received for t in tallies)
            window = (max(lasts) - min(firsts)) if firsts and lasts else 0.0
            self.delivered_rate = (received - 1) / window if received > 1 and window > 0 else 0.0
            self.total_rate = self.delivered_rate
        else:
            self.delivered_rate = rates[0] if rates else 0.0
            self.median_client_rate = statistics.median(rates) if len(rates) > 1 else None
        ordered = sorted(itertools.chain.from_iterable(t.latencies for t in tallies))
        self.p50_ms = percentile_ms(ordered, 0.50)
        self.p99_ms = percentile_ms(ordered, 0.99)
        self.max_ms = percentile_ms(ordered, 1.0)
        self.received = sum(t.received for t in tallies)
        shortfalls = [t.expected - t.received for t in tallies]
        self.lost = sum(shortfalls)
        self.lost_worst = max(shortfalls, default=0)
        self.clients_short = sum(1 for short in shortfalls if short)
        self.duplicates = sum(t.duplicates for t in tallies)
        worst = max(tallies, key=lambda t: t.expected - t.received)
        self.missing = worst.missing() if self.lost_worst else []
        self.frames = sum(t.frames for t in tallies)
        if self.frames:
            self.events_per_frame = self.received / self.frames
        self.longest_gap_s = max((t.longest_gap for t in tallies), default=0.0)
        if len(tallies) > 1:
            self.per_client = [
                {
                    "rate": round(t.rate(), 1),
                    "received": t.received,
                    "expected": t.expected,
                    "p99_ms": _rounded(t.percentile_ms(0.99)),
                }
                for t in tallies
            ]
        kinds: Counter[str] = Counter(audience.unexpected)
        for client in audience.clients:
            kinds.update({f"frame:{k}": v for k, v in client.frame_kinds.items() if k not in ("hello", "subscribed")})
        self.other_frames = dict(kinds)


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


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
    *,
    nodelay: bool = False,
) -> dict[str, Any]:
    """Warm up (one message per device), then publish the measured messages and wait for them to arrive."""
    warm = await publish(port, qos, WARMUP, 0, nodelay=nodelay)
    await wait_delivered(receiver, receiver.warmup, cap=60.0, idle=3.0, watch=watch)
    if watch is not None:
        watch.stalls.clear()  # a stall in the warm-up is the lost-message wait, not the measurement's
    if receiver.warmup.received < WARMUP:
        print(f"  warning: warm-up delivered {receiver.warmup.received}/{WARMUP}", file=sys.stderr)
    if on_start is not None:
        on_start()
    published = await publish(port, qos, messages, WARMUP, rate, nodelay=nodelay)
    published["warmup"] = warm
    await wait_delivered(receiver, receiver.measured, cap=delivery_cap(messages), watch=watch)
    return published


@contextlib.asynccontextmanager
async def aiomqtt_subscriber(port: int, qos: int, receiver: Receiver, *, client_prefix: str) -> AsyncIterator[None]:
    """An ``aiomqtt.Client`` (MQTT 5, client id ``<client_prefix>-<8 hex>``) subscribed to the telemetry, feeding
    ``receiver`` (n, payload ts, receive time) per message while the block runs: the raw reference of this script
    and limits.py's ``aiomqtt subscriber``."""
    import aiomqtt
    import orjson

    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"{client_prefix}-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"{PREFIX}/+/telemetry", qos=qos)

        async def consume() -> None:
            async for message in client.messages:
                now = time.time()
                data = orjson.loads(message.payload)
                receiver.event(data["n"], data["ts"], now)

        consumer = asyncio.create_task(consume())
        try:
            yield
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer


async def case_raw(args: argparse.Namespace, workdir: Path) -> CaseResult:
    result = CaseResult(case=f"aiomqtt raw (qos{args.qos})", qos=args.qos, messages=args.messages)
    procs = Processes()
    try:
        port = start_mosquitto(procs, workdir, extra_config=broker_config(args))
        receiver = Receiver(args.messages)
        async with aiomqtt_subscriber(port, args.qos, receiver, client_prefix="bench-raw"):
            published = await measure(receiver, port, args.qos, args.messages, args.rate, nodelay=nodelay(args))
        result.fill(receiver, published)
        result.events_per_frame = 1.0
        result.frames = receiver.measured.received
    finally:
        procs.stop_all()
        result.exit_codes = {proc.name: proc.returncode for proc in procs.items}
        result.log_problems = {p.name: found for p in procs.items if (found := log_problems(p))}
    return result


def nodelay(args: argparse.Namespace) -> bool:
    return bool(args.nodelay == "on")


def broker_config(args: argparse.Namespace) -> str:
    """More lines for the benchmark's Mosquitto: ``set_tcp_nodelay true`` as in deploy/mosquitto/gateway.conf."""
    return "set_tcp_nodelay true\n" if nodelay(args) else ""


def audience_label(args: argparse.Namespace) -> str:
    if args.watchers:
        return f"{args.watchers} one-device clients"
    return f"{args.clients} client{'s' if args.clients != 1 else ''}"


def extended(args: argparse.Namespace) -> bool:
    """Whether any of the options beyond one client and one measurement is in use (the table shows more)."""
    return bool(args.clients != 1 or args.watchers or args.rates or args.at)


def phase_plan(args: argparse.Namespace, saturating: float) -> list[tuple[str, float]]:
    """The paced phases after the first measurement: (label, msg/s), the fractions first, then the absolute rates."""
    plan: list[tuple[str, float]] = []
    if saturating > 0:
        for fraction in args.rates:
            rate = fraction * saturating
            plan.append((f"{100 * fraction:g}% ({rate:,.0f} msg/s)", rate))
    for rate in args.at:
        plan.append((f"at {rate:,.0f} msg/s", rate))
    return plan


def phase_messages(args: argparse.Namespace, rate: float) -> int:
    seconds: float = args.phase_seconds
    return max(PHASE_MIN_MESSAGES, round(rate * seconds))


def gateway_bench_env(args: argparse.Namespace, *, workdir: Path, mqtt_port: int, layer: str) -> dict[str, str]:
    env = gateway_env(workdir=workdir, mqtt_port=mqtt_port, layer=layer)
    env.update(BENCH_GATEWAY_ENV)
    env.update(args.gateway_env)
    return env


async def wait_registered(database: Path, devices: int, cap: float = 60.0) -> int:
    """Until the gateway has registered ``devices`` devices (or ``cap`` s passed); the number registered."""
    deadline = time.monotonic() + cap
    found = 0
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(count_devices, database)
        if found >= devices:
            break
        await asyncio.sleep(0.2)
    return found


def count_devices(database: Path) -> int:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
            return int(db.execute("SELECT COUNT(*) FROM devices_device").fetchone()[0])
    except sqlite3.Error:
        return 0


async def case_gateway(args: argparse.Namespace, layer: str, workdir: Path) -> list[CaseResult]:
    """One layer: the gateway started once, the clients connected once, then the warm-up and every phase."""
    label = audience_label(args)
    name = f"{layer} (qos{args.qos})" if not extended(args) else f"{layer}, {label} (qos{args.qos})"
    devices = args.watchers or DEVICES
    results: list[CaseResult] = []
    procs = Processes()
    profiler = Profiler(args.profile, workdir)
    monitor = LoopMonitor()
    audience: Audience | None = None
    database = workdir / "bench.sqlite3"
    web_port = 0
    measuring: CaseResult | None = None  # the phase being measured, until its figures are in

    def new_result(phase: str, index: int) -> CaseResult:
        return CaseResult(
            case=name,
            qos=args.qos,
            messages=args.messages,
            layer=layer,
            audience=label,
            phase=phase,
            phase_index=index,
            clients=args.watchers or args.clients,
            watchers=args.watchers,
            warmup_expected=devices,
        )

    try:
        mqtt_port = start_mosquitto(procs, workdir, extra_config=broker_config(args))
        env = gateway_bench_env(args, workdir=workdir, mqtt_port=mqtt_port, layer=layer)
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
        watch = Watch(procs=gateway, database=database)
        next_n = 0

        subscriptions: list[list[str] | None]
        if args.watchers:
            # A client can only subscribe to a device that exists: register them first (one message each).
            for _ in range(2):
                await publish(mqtt_port, args.qos, devices, next_n, devices=devices, nodelay=nodelay(args))
                next_n += devices
                if await wait_registered(database, devices) >= devices:
                    break
            subscriptions = [[device_for(k, devices)] for k in range(devices)]
        else:
            subscriptions = [None] * args.clients
        audience = Audience(await open_clients("127.0.0.1", web_port, token, subscriptions), watchers=args.watchers)
        monitor.start()

        # Warm-up: one message per device (auto-registration, first frames), not measured.
        warm = audience.add_phase("warm-up", next_n, devices)
        next_n = warm.end
        warm_published = await publish(mqtt_port, args.qos, devices, warm.first, devices=devices, nodelay=nodelay(args))
        await wait_for(PhaseProgress(audience, warm), cap=60.0, idle=3.0, watch=watch)
        audience.settle()
        watch.stalls.clear()  # a stall in the warm-up is the lost-message wait, not the measurement's
        # The slowest client's share of the warm-up; with one-device clients, all clients' together.
        if args.watchers:
            warmup_received = sum(tally.received for tally in warm.tallies)
        else:
            warmup_received = min(tally.received for tally in warm.tallies)
        if warmup_received < devices:
            print(f"  warning: warm-up delivered {warmup_received}/{devices}", file=sys.stderr)
        reset_frame_counts(audience)

        plan: list[tuple[str, float, int]] = [
            ("flat out" if not args.rate else f"at {args.rate:,.0f} msg/s", args.rate, args.messages)
        ]
        metrics_before: dict[str, float] = {}
        closed: set[int] = set()  # clients whose closing was reported
        parsed_before = audience.parse_seconds
        index = 0
        while index < len(plan):
            phase_name, rate, count = plan[index]
            if index:
                print(f"  {phase_name}: {count:,} messages ...", flush=True)
            result = measuring = new_result(phase_name, index)
            result.messages = count
            results.append(result)
            phase = audience.add_phase(phase_name, next_n, count, rate)
            next_n = phase.end
            profiled = args.profile_phase in (index, -1)
            if profiled:
                profiler.start(gateway + ([self_proc()] if extended(args) else []), tag=f"-phase{index}")
            published = await publish(mqtt_port, args.qos, count, phase.first, rate, devices, nodelay=nodelay(args))
            if index == 0:
                published["warmup"] = warm_published
            progress = PhaseProgress(audience, phase)
            await wait_for(progress, cap=delivery_cap(count), watch=watch)
            audience.settle()
            if profiled:
                result.profile = await asyncio.to_thread(profiler.finish)
            result.fill_phase(audience, phase, published)
            measuring = None
            reset_frame_counts(audience)
            for tally in phase.tallies:
                tally.latencies = []  # reported: only the numbers seen are kept (duplicates, stragglers)
            for client in audience.clients:
                if client.closed and client.index not in closed:
                    closed.add(client.index)
                    result.remarks.append(f"client {client.index} was closed: {client.closed}")
            result.warmup_received = warmup_received
            firsts = [t.first_at for t in phase.tallies if t.first_at is not None]
            lasts = [t.last_at for t in phase.tallies if t.last_at is not None]
            result.receiver = monitor.window(min(firsts, default=None), max(lasts, default=None))
            result.receiver["deferred_parse_s"] = round(audience.parse_seconds - parsed_before, 3)
            parsed_before = audience.parse_seconds
            result.stalls, watch.stalls = watch.stalls, []
            result.died = list(watch.died)
            result.stored = await asyncio.to_thread(count_stored, database, phase.first, phase.end)
            metrics = await asyncio.to_thread(read_metrics, web_port)
            result.metrics = metrics
            result.metrics_delta = {
                k: v - metrics_before.get(k, 0.0) for k, v in metrics.items() if v != metrics_before.get(k, 0.0)
            }
            metrics_before = metrics
            if watch.died:
                break
            if index == 0:
                plan += [(label_, r, phase_messages(args, r)) for label_, r in phase_plan(args, result.delivered_rate)]
                if args.rates and not result.delivered_rate:
                    result.remarks.append("no saturating rate measured: the --rates phases were skipped")
            index += 1
    except Exception as exc:
        failed = measuring or new_result("flat out" if not results else "after " + results[-1].phase, len(results))
        failed.error = f"{type(exc).__name__}: {exc}"
        if failed is not measuring:
            results.append(failed)
    finally:
        if audience is not None:
            audience.close()
        await monitor.stop()
        if profiler.runs:
            await asyncio.to_thread(profiler.finish)
        procs.stop_all()
        if results:
            results[0].exit_codes = {proc.name: proc.returncode for proc in procs.items}
            results[0].log_problems = {p.name: found for p in procs.items if (found := log_problems(p))}
    return results


def reset_frame_counts(audience: Audience) -> None:
    """Start counting other frames and unexpected events afresh (they are reported per phase)."""
    audience.unexpected.clear()
    for client in audience.clients:
        client.frame_kinds.clear()


@dataclass
class SelfProc:
    """This process, as a ``Profiler`` target: the receiving side of the WebSocket cases."""

    name: str = "receiver"
    pid: int = field(default_factory=os.getpid)


def self_proc() -> Any:
    return SelfProc()


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

# With several clients or phases (see README): more columns.
EXTENDED_COLUMNS = [
    ("case", "case", "<"),
    ("phase", "phase", "<"),
    ("published msg/s", "published_rate", ">"),
    ("delivered msg/s", "delivered_rate", ">"),
    ("median client", "median_client_rate", ">"),
    ("deliveries/s", "total_rate", ">"),
    ("ratio to raw", "ratio_to_raw", ">"),
    ("p50 ms", "p50_ms", ">"),
    ("p99 ms", "p99_ms", ">"),
    ("lost", "lost", ">"),
    ("worst client", "lost_worst", ">"),
    ("events/frame", "events_per_frame", ">"),
    ("rx CPU %", "receiver_cpu", ">"),
    ("rx late ms", "receiver_late", ">"),
]


def _value(result: CaseResult, key: str) -> Any:
    if key == "receiver_cpu":
        share = result.receiver.get("cpu_share")
        return None if share is None else 100 * share
    if key == "receiver_late":
        return result.receiver.get("late_p99_ms")
    return getattr(result, key)


def _cell(key: str, value: Any, error: str | None) -> str:
    if error and key not in ("case", "phase"):
        return "-"
    if value is None:
        return "-"
    if key in ("published_rate", "delivered_rate", "median_client_rate", "total_rate", "receiver_cpu"):
        return f"{value:,.0f}"
    if key == "ratio_to_raw":
        return f"{value:.2f}"
    if key in ("p50_ms", "p99_ms", "receiver_late"):
        return f"{value:,.1f}"
    if key == "events_per_frame":
        return f"{value:.1f}"
    return str(value)


def table(results: list[CaseResult], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    rows = [[title for title, _, _ in columns]]
    rows += [[_cell(key, _value(r, key), r.error) for _, key, _ in columns] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for index, row in enumerate(rows):
        cells = [f"{cell:{align}{width}}" for cell, (_, _, align), width in zip(row, columns, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def title(r: CaseResult) -> str:
    """How notes name a result: the case, and the phase when a case has several."""
    return r.case if r.phase_index == 0 and r.phase in ("flat out", "") else f"{r.case} [{r.phase}]"


def result_notes(r: CaseResult) -> list[str]:
    """What to say about one result (without its name)."""
    out: list[str] = []
    if r.error:
        return [f"FAILED: {r.error}"]
    for dead in r.died:
        out.append(f"{dead} DURING the measurement")
    for stall in r.stalls:
        out.append(
            f"stalled: nothing received or stored for {stall['after_s']} s at {stall['received']:,}"
            f" received / {stall['stored']} stored (py-spy dumps in the JSON)"
        )
    if r.longest_gap_s > 2.0:
        out.append(f"longest pause between two receives: {r.longest_gap_s:.1f} s")
    if r.duplicates:
        out.append(f"{r.duplicates} duplicate event(s)")
    if r.lost and r.stored is not None:
        never = max(0, r.messages - r.stored)
        if r.clients > 1:
            # Each message never stored is lost to every client that wanted it (one client with --watchers).
            never_deliveries = never if r.watchers else never * r.clients
            out.append(
                f"{r.lost} deliveries lost ({r.clients_short} of {r.clients} clients short, worst {r.lost_worst}):"
                f" {never} message(s) never stored (lost between the broker and the database), "
                f"{max(0, r.lost - never_deliveries)} stored but not delivered to a socket"
            )
        else:
            out.append(
                f"{r.lost} lost: {never} never stored (lost between the broker and the"
                f" database), {max(0, r.stored - r.received)} stored but not delivered to the socket"
            )
    if r.missing:
        whose = " (the worst client's)" if r.clients > 1 else ""
        out.append(f"missing message numbers n{whose} (first {len(r.missing)}): {r.missing}")
    if r.phase_index == 0 and r.warmup_received < r.warmup_expected:
        whose = "" if r.clients == 1 else " (all clients)" if r.watchers else " (slowest client)"
        out.append(f"warm-up delivered {r.warmup_received}/{r.warmup_expected}{whose}")
    if r.other_frames:
        out.append(f"other frames/messages: {r.other_frames}")
    if r.publisher.get("errors"):
        out.append(f"publish errors (paho rc: count): {r.publisher['errors']}")
    moved = r.metrics_delta or r.metrics
    drops = {k: v for k, v in moved.items() if v and re.search(r"dropped|lost|failures|errors|retries", k)}
    if drops:
        out.append(f"gateway counters: {drops}")
    share, late = r.receiver.get("cpu_share"), r.receiver.get("late_p99_ms")
    if share is not None and late is not None:
        if share > RECEIVER_BUSY:
            out.append(
                f"the receiving process was busy ({100 * share:.0f} % of a core, its event loop {late:.1f} ms late"
                " at p99) while receiving: part of the latency may be its own"
            )
        elif late > RECEIVER_LATE_MS:
            out.append(
                f"the receiving process's event loop woke up to {late:.1f} ms late (p99) at {100 * share:.0f} % of a"
                " core: the machine was short of CPU, which delays every process here"
            )
    for name, code in r.exit_codes.items():
        if code not in (0, None, -signal.SIGTERM):
            out.append(f"{name} exited with {code}")
    for name, lines in r.log_problems.items():
        out.append(f"{len(lines)} notable line(s) in the {name} log, first: {lines[0]}")
    out += r.remarks
    return out


def notes(results: list[CaseResult]) -> list[str]:
    return [f"{title(r)}: {line}" for r in results for line in result_notes(r)]


def headline(args: argparse.Namespace) -> str:
    if args.watchers:
        who = (
            f"{args.watchers} WebSocket clients, each subscribed to one of {args.watchers} devices"
            " (every message reaches one client)"
        )
        devices = args.watchers
    elif args.clients > 1:
        who, devices = f"{args.clients} WebSocket clients, each subscribed to every device", DEVICES
    else:
        who, devices = "ONE WebSocket client", DEVICES
    paced = f", paced at {args.rate:,.0f} msg/s" if args.rate else ""
    return (
        f"MQTT -> {who}, QoS {args.qos}, {args.messages:,} messages of ~120 B from {devices:,} devices{paced}"
        f" ({os.cpu_count()} CPUs)"
    )


LEGEND = """\
delivered msg/s: one-device clients: all clients' deliveries together; otherwise the SLOWEST client's rate (median
client: the median one's; deliveries/s: the sum over clients). lost: expected minus distinct received, summed over
clients (worst client: the most one client missed). p50/p99: every delivery to every client. rx CPU % / rx late ms:
this (receiving) process's CPU, and how late its event loop ran at p99, while the phase's events arrived."""


def target_lines(args: argparse.Namespace, results: list[CaseResult]) -> list[str]:
    """The issue's target: p99 under 50 ms at 1,000 msg/s with 50 clients."""
    clients, rate, limit = TARGET
    if args.watchers or args.clients != clients:
        return []
    lines = []
    for r in results:
        if r.target_rate == rate and not r.error and r.p99_ms is not None:
            verdict = "met" if r.p99_ms < limit and not r.lost else "NOT met"
            lost = f", {r.lost} lost" if r.lost else ""
            lines.append(
                f"target: p99 < {limit:g} ms at {rate:,.0f} msg/s with {clients} clients: {r.layer}"
                f" p99 {r.p99_ms:.1f} ms{lost} ({verdict})"
            )
    return lines


def to_rows(results: list[CaseResult]) -> list[Any]:
    """The results as bench/rows.py rows (section "websocket")."""
    from rows import Row

    rows = []
    for r in results:
        if not r.layer or r.case.startswith("aiomqtt"):
            case = f"aiomqtt raw (this run's reference){'' if r.phase_index == 0 else ', ' + r.phase}"
            base = None
        else:
            case = f"{r.layer}, {r.audience or '1 client'}, {r.phase}"
            base = "aiomqtt" if r.phase_index == 0 and not r.target_rate else None
        extra: dict[str, Any] = {}
        if not r.error:
            extra["lost"] = r.lost
            if r.clients > 1:
                extra["worst client lost"] = r.lost_worst
            if r.events_per_frame is not None:
                extra["events/frame"] = round(r.events_per_frame, 1)
            extra["published msg/s"] = round(r.published_rate)
            if r.median_client_rate is not None and r.clients > 1:
                extra["median client msg/s"] = round(r.median_client_rate)
            if r.total_rate is not None and r.clients > 1:
                extra["deliveries/s"] = round(r.total_rate)
            if r.receiver:
                extra["receiver CPU %"] = round(100 * r.receiver.get("cpu_share", 0.0))
        rows.append(
            Row(
                section="websocket",
                case=case,
                qos=r.qos,
                rate=None if r.error else round(r.delivered_rate, 1),
                p50_ms=None if r.p50_ms is None or r.error else round(r.p50_ms, 2),
                p99_ms=None if r.p99_ms is None or r.error else round(r.p99_ms, 2),
                ratio_base=base,
                extra=extra,
                notes=result_notes(r) if not r.error else [],
                error=r.error,
            )
        )
    return rows


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
                print(f"\npy-spy {title(r)} / {name}: {summary['error']}")
                continue
            print(f"\npy-spy {title(r)} / {name}: {summary['samples']} samples ({summary['file']})")
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
    parser.add_argument(
        "--profile-phase",
        type=int,
        default=0,
        metavar="N",
        help="with --profile: the phase to profile (0: the first, flat out; 1...: the paced ones in order; -1: all)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    parser.add_argument(
        "--clients", type=int, default=1, help="WebSocket clients, each subscribed to every device (default 1)"
    )
    parser.add_argument(
        "--watchers",
        type=int,
        default=0,
        metavar="M",
        help="instead: M clients each subscribed to one device; the publisher then uses exactly M devices",
    )
    parser.add_argument(
        "--rates",
        default="",
        metavar="FRACTIONS",
        help="after the flat-out run, paced runs at these fractions of its delivered rate, e.g. 0.25,0.5,0.9",
    )
    parser.add_argument(
        "--at",
        action="append",
        default=[],
        metavar="MSG_PER_S",
        help="also a paced run at this many msg/s (repeatable, or a comma list)",
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=5.0,
        help=f"length of a paced run: max({PHASE_MIN_MESSAGES:,}, rate x this) messages (default 5)",
    )
    parser.add_argument(
        "--nodelay",
        choices=("on", "off"),
        default="on",
        help="Nagle's algorithm off (TCP_NODELAY) in Mosquitto (set_tcp_nodelay true) and on the publisher's socket",
    )
    parser.add_argument("--rows", metavar="FILE", help="also write the results as bench/rows.py rows to FILE")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="diagnostic: a gateway setting for this run (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = 3000 if args.quick else 20000
    if args.messages < 2:
        parser.error("--messages must be at least 2")
    if args.clients < 1 or args.watchers < 0:
        parser.error("--clients must be at least 1 and --watchers at least 0")
    if args.watchers and args.clients != 1:
        parser.error("--clients and --watchers are two different cases: give one of them")
    if args.watchers > DEVICES:
        parser.error(f"--watchers: at most {DEVICES}")
    try:
        args.rates = [float(item) for item in args.rates.split(",") if item.strip()]
        args.at = [float(item) for value in args.at for item in value.split(",") if item.strip()]
    except ValueError as exc:
        parser.error(f"--rates and --at take numbers: {exc}")
    if any(rate <= 0 for rate in args.rates + args.at):
        parser.error("--rates and --at must be positive")
    parse_gateway_env(parser, args)
    parse_layers(parser, args, LAYERS)
    return args


def parse_gateway_env(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--gateway-env NAME=VALUE`` (repeatable) into ``args.gateway_env``, a dict (shared with command_rtt.py and
    idle_ws.py)."""
    pairs = [item.partition("=") for item in args.gateway_env]
    if any(not name or not sep for name, sep, _ in pairs):
        parser.error("--gateway-env takes NAME=VALUE")
    args.gateway_env = {name: value for name, _, value in pairs}


def parse_layers(parser: argparse.ArgumentParser, args: argparse.Namespace, allowed: Iterable[str]) -> None:
    """``--layers``, comma-separated, into ``args.layers``, a list of names from ``allowed`` (shared with
    command_rtt.py and idle_ws.py)."""
    args.layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    unknown = set(args.layers) - set(allowed)
    if unknown:
        parser.error(f"unknown layer(s): {', '.join(sorted(unknown))}")


T = TypeVar("T")


async def run_cases(
    tmp: Path,
    cases: Iterable[tuple[str, Callable[[Path], Awaitable[T]]]],
    what: str,
    failed: Callable[[str, str], T],
) -> list[T]:
    """Run each ``(name, run)`` case in turn as ``run(tmp / name)`` (a fresh directory), announcing it as
    ``- name: what ...`` and its time; a case that raises gives ``failed(name, "ExcType: message")`` instead
    (shared with command_rtt.py and idle_ws.py)."""
    results: list[T] = []
    for name, run in cases:
        workdir = tmp / name
        workdir.mkdir()
        print(f"- {name}: {what} ...", flush=True)
        started = time.monotonic()
        try:
            result = await run(workdir)
        except Exception as exc:
            result = failed(name, f"{type(exc).__name__}: {exc}")
        print(f"  done in {time.monotonic() - started:.1f} s", flush=True)
        results.append(result)
    return results


async def main_async(args: argparse.Namespace, tmp: Path) -> list[CaseResult]:
    async def raw(workdir: Path) -> list[CaseResult]:
        return [await case_raw(args, workdir)]

    def failed(name: str, error: str) -> list[CaseResult]:
        result = CaseResult(case=f"{name} (qos{args.qos})", qos=args.qos, messages=args.messages, layer=name)
        result.error = error
        return [result]

    cases: list[tuple[str, Callable[[Path], Awaitable[list[CaseResult]]]]] = []
    if not args.no_raw:
        cases.append(("raw", raw))
    for layer in args.layers:
        cases.append((layer, functools.partial(case_gateway, args, layer)))
    found = await run_cases(tmp, cases, f"{args.messages:,} messages at QoS {args.qos}", failed)
    results = [result for batch in found for result in batch]
    raw_result = next((r for r in results if r.case.startswith("aiomqtt") and not r.error), None)
    for r in results:
        # The raw reference is measured once, like each case's first run (flat out, or at --rate): only that
        # run has a ratio.
        if raw_result is not None and raw_result.delivered_rate and not r.error and r.phase_index == 0:
            r.ratio_to_raw = r.delivered_rate / raw_result.delivered_rate
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
    if args.gateway_env:
        print(f"DIAGNOSTIC run: gateway environment {args.gateway_env}")
    print(headline(args))
    print(table(results, EXTENDED_COLUMNS if extended(args) else COLUMNS))
    if extended(args):
        print(LEGEND)
    for line in target_lines(args, results):
        print(line)
    cpu = cpu_report(cpu_before, cpu_seconds())
    print_cpu_note(cpu)
    for line in notes(results):
        print(f"note: {line}")
    print_profiles(results)
    if args.rows:
        from rows import write_rows

        write_rows(args.rows, to_rows(results))
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
