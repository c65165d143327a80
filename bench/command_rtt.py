#!/usr/bin/env python
"""Command round trip, WebSocket -> gateway -> device -> gateway -> WebSocket: latency per channel layer.

One WebSocket client (in this process) sends ``{"op": "command", ...}`` frames for the device ``bench-dev``; a
device (a separate process: one paho client subscribed to ``bench/bench-dev/commands/+`` at QoS 1) answers each
command at once on ``bench/bench-dev/replies``; the client waits for the ``succeeded`` command frame. Cases:

* ``memory``: ``manage.py rungateway`` (Daphne + bridge in one process, in-memory channel layer).
* ``redis``: ``daphne config.asgi:application`` and ``manage.py runbridge``, two processes joined by Redis.

and two modes per case: ``sequential`` (send, wait for ``succeeded``, send the next) and ``concurrent``
(``--concurrency`` commands in flight). Each case gets its own Mosquitto, SQLite database and (Redis) a flushed
Redis db (``--redis-db``, default 14), started and stopped with the helpers of ``mqtt_to_ws.py``. See
bench/README.md.

    python bench/command_rtt.py [--commands N] [--concurrency C] [--layers memory,redis] [--quick]
                                [--profile SECONDS] [--keep] [--redis-db DB] [--rows FILE]
                                [--nodelay off|broker|all] [--gateway-env NAME=VALUE ...]   # diagnostics
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqtt_to_ws import (
    BIN,
    LAYERS,
    PREFIX,
    RESULTS_DIR,
    Proc,
    Processes,
    Profiler,
    cpu_report,
    cpu_seconds,
    flush_redis_db,
    free_port,
    gateway_env,
    log_problems,
    parse_gateway_env,
    parse_layers,
    prepare_database,
    print_cpu_note,
    py_spy_dumps,
    read_metrics,
    redis_url,
    run_cases,
    run_in_tempdir,
    start_mosquitto,
    versions,
    wait_ready,
)
from rows import Row, write_rows

SCRIPT = str(Path(__file__).resolve())
RESULT_FILE = RESULTS_DIR / "command_rtt.json"
DEVICE = "bench-dev"
TARGET_P99_MS = 30.0  # the target for the sequential case
WARMUP = 20  # commands before measuring (registration, first claim, connection set-up)
# The per-socket frame rate (default 20/s) and per-user command rate (60/min) limits are abuse protection, not
# what this measures: one benchmark user sends ~50 commands per second.
ABUSE_LIMITS_OFF = {"GATEWAY_WS_FRAMES_PER_SECOND": "1000000", "GATEWAY_COMMANDS_PER_MINUTE": "100000000"}
MAX_TIMEOUTS = 3  # commands without a final state before the benchmark gives up on a case
COMMAND_WAIT = 40.0  # per command: more than the gateway's default command timeout (30 s) plus a sweep
STATES = ("pending", "sent", "succeeded")
LOST_WAKE = 0.5  # s; sequential commands slower than this to reach the device: wake-up lost, the 1 s poll found it
PYSPY_RATE = 200  # samples per second, as mqtt_to_ws.Profiler records them (idle threads are not sampled)
FINAL = frozenset({"succeeded", "failed", "expired", "rejected"})


# ----------------------------------------------------------------------------------------------------
# The device (a separate process: `python bench/command_rtt.py _device --port P`)
# ----------------------------------------------------------------------------------------------------


def run_device(argv: list[str]) -> int:
    """Answer every command at once; print ``ready``, then on stdin EOF a JSON line with what it saw."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    parser = argparse.ArgumentParser(prog="command_rtt.py _device")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default=DEVICE)
    args = parser.parse_args(argv)
    base = f"{PREFIX}/{args.device}"

    subscribed = threading.Event()
    connected = threading.Event()
    seen: dict[str, list[Any]] = {}  # command id -> [received, replied, n, command name, duplicate count]
    errors: Counter[str] = Counter()
    lock = threading.Lock()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            errors[f"connect:{reason}"] += 1
            return
        client.subscribe(f"{base}/commands/+", qos=1)
        connected.set()

    def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            errors["subscribe_refused"] += 1
        subscribed.set()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        received = time.time()
        try:
            command = json.loads(message.payload)
            command_id = command["id"]
            n = command.get("params", {}).get("n")
        except (ValueError, KeyError, TypeError, AttributeError):
            errors["bad_command_payload"] += 1
            return
        reply = json.dumps({"id": command_id, "ok": True, "result": {"n": n}})
        info = client.publish(f"{base}/replies", reply, qos=1)
        replied = time.time()
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            errors[f"reply_rc:{info.rc}"] += 1
        with lock:
            if command_id in seen:
                seen[command_id][4] += 1  # a QoS 1 redelivery, or the gateway publishing twice
            else:
                seen[command_id] = [received, replied, n, message.topic.rsplit("/", 1)[-1], 0]

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-device-{os.getpid()}", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(100)
    client.will_set(f"{base}/status", "offline", qos=1, retain=True)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=60)
    client.loop_start()
    try:
        if not (connected.wait(10) and subscribed.wait(10)):
            print(json.dumps({"error": f"device could not connect and subscribe: {dict(errors)}"}), flush=True)
            return 1
        online = client.publish(f"{base}/status", "online", qos=1, retain=True)
        online.wait_for_publish(10)
        print("ready", flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
    finally:
        client.disconnect()  # a clean disconnect: the will (offline) is not sent
        client.loop_stop()
    with lock:
        print(json.dumps({"commands": seen, "errors": dict(errors)}), flush=True)
    return 0


class Device:
    """The device process: started, waited for (``ready``), and stopped (its stdin closed) for its records."""

    def __init__(self, port: int, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.env = env
        self.stderr_path = workdir / "device.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.records: dict[str, list[Any]] = {}
        self.errors: dict[str, int] = {}

    async def start(self) -> None:
        argv = [sys.executable, SCRIPT, "_device", "--port", str(self.port)]
        with self.stderr_path.open("wb") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=self.env
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        if line.strip() != b"ready":
            raise RuntimeError(f"device did not start: {line.decode(errors='replace')[:500]}{self._stderr()}")

    async def stop(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()
            out = await asyncio.wait_for(self.proc.stdout.read(), 15)
            await asyncio.wait_for(self.proc.wait(), 5)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            self.errors["device_stop"] = 1
            return
        lines = out.decode(errors="replace").strip().splitlines()
        if not lines:
            self.errors["device_output"] = 1
            return
        data = json.loads(lines[-1])
        self.records = data.get("commands", {})
        self.errors = data.get("errors", {})

    def _stderr(self) -> str:
        with contextlib.suppress(OSError):
            return "\n" + self.stderr_path.read_text(errors="replace")[-2000:]
        return ""


# ----------------------------------------------------------------------------------------------------
# The WebSocket client
# ----------------------------------------------------------------------------------------------------


@dataclass
class Tracked:
    """One command as the client saw it (``time.time()`` throughout, the gateway's ``ts`` on the same clock)."""

    request_id: str
    n: int
    sent_at: float = 0.0
    command_id: str | None = None
    received: dict[str, float] = field(default_factory=dict)  # state -> first receive time at the client
    server_ts: dict[str, float] = field(default_factory=dict)  # state -> the frame's ts (gateway's time)
    frames: Counter[str] = field(default_factory=Counter)  # state -> frames received (duplicates show here)
    order: list[str] = field(default_factory=list)  # states in the order their frames arrived
    final: str | None = None
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Client:
    """The benchmark's WebSocket client: routes command frames to the command they belong to by request_id."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.tracked: dict[str, Tracked] = {}
        self.by_command_id: dict[str, Tracked] = {}
        self.other: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []
        self.gaps: list[dict[str, Any]] = []  # gap frames: the gateway says events were lost on the way
        self.control: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # subscribed / error frames without a ref
        self.reader: asyncio.Task[None] | None = None
        self.polling = False  # subscribe_device() is waiting for the device to be registered
        self.closed: str | None = None  # why the reader stopped
        self.timeouts = 0

    async def send(self, frame: dict[str, Any]) -> None:
        import orjson

        await self.ws.send(orjson.dumps(frame).decode())

    def start(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader

    async def _read(self) -> None:
        import orjson

        try:
            async for raw in self.ws:
                now = time.time()
                frame = orjson.loads(raw)
                events = frame["events"] if frame.get("type") == "batch" else [frame]
                for event in events:
                    if isinstance(event, str):  # a batch may carry ready-made frame texts
                        event = orjson.loads(event)
                    self._route(event, now)
            self.closed = f"socket closed by the gateway (code {getattr(self.ws, 'close_code', None)})"
        except asyncio.CancelledError:
            self.closed = "reader stopped"
            raise
        except Exception as exc:
            self.closed = f"reader failed: {exc!r}"
        finally:
            for tracked in self.tracked.values():  # nobody will answer these now
                if tracked.final is None:
                    tracked.final, tracked.error = "no answer", self.closed
                    tracked.done.set()

    def _route(self, event: dict[str, Any], now: float) -> None:
        kind = event.get("type")
        if kind == "command":
            tracked = self.tracked.get(str(event.get("request_id")))
            if tracked is None:
                tracked = self.by_command_id.get(str(event.get("command_id")))
            if tracked is None:
                self.other["command frame for an unknown request"] += 1
                return
            state = str(event.get("state"))
            tracked.command_id = tracked.command_id or event.get("command_id")
            if tracked.command_id:
                self.by_command_id[tracked.command_id] = tracked
            tracked.frames[state] += 1
            tracked.order.append(state)
            tracked.received.setdefault(state, now)
            if isinstance(event.get("ts"), int | float):
                tracked.server_ts.setdefault(state, float(event["ts"]))
            if state in FINAL and tracked.final is None:
                tracked.final = state
                tracked.error = event.get("error")
                tracked.done.set()
        elif kind == "error" and isinstance(event.get("ref"), str) and event["ref"] in self.tracked:
            tracked = self.tracked[event["ref"]]
            self.errors.append(event)
            if tracked.final is None:
                tracked.final = f"error:{event.get('code')}"
                tracked.error = event.get("message")
                tracked.done.set()
        elif kind == "gap":
            self.gaps.append({"at": now, "from": event.get("from"), "to": event.get("to")})
            self.other["frame:gap"] += 1
        elif kind in ("subscribed", "error", "hello", "pong"):
            if kind == "error" and not (self.polling and event.get("code") == "unknown_device"):
                self.errors.append(event)  # (unknown_device while polling for registration is expected)
            self.control.put_nowait(event)
        else:
            self.other[f"frame:{kind}"] += 1

    async def command(self, request_id: str, n: int) -> Tracked:
        """Send one command and wait for its final state (or give up after ``COMMAND_WAIT`` s)."""
        if self.closed is not None:
            raise RuntimeError(f"WebSocket unusable: {self.closed}")
        if self.timeouts >= MAX_TIMEOUTS:
            raise RuntimeError(f"gave up: {self.timeouts} commands had no final state within {COMMAND_WAIT:.0f} s")
        tracked = Tracked(request_id=request_id, n=n)
        self.tracked[request_id] = tracked
        frame = {"op": "command", "device": DEVICE, "name": "ping", "params": {"n": n}, "request_id": request_id}
        tracked.sent_at = time.time()
        await self.send(frame)
        try:
            await asyncio.wait_for(tracked.done.wait(), COMMAND_WAIT)
        except TimeoutError:
            tracked.final = tracked.final or "timeout"
            self.timeouts += 1
        return tracked

    async def subscribe_device(self, limit: float = 30.0) -> int:
        """Subscribe to the device until the gateway knows it (no unknown_device error); returns attempts."""
        deadline = time.monotonic() + limit
        self.polling = True
        try:
            return await self._poll_subscribe(deadline, limit)
        finally:
            self.polling = False

    async def _poll_subscribe(self, deadline: float, limit: float) -> int:
        attempts = 0
        while True:
            attempts += 1
            while not self.control.empty():
                self.control.get_nowait()
            await self.send({"op": "subscribe", "devices": [DEVICE]})
            unknown = False
            while True:
                frame = await asyncio.wait_for(self.control.get(), 10)
                if frame.get("type") == "error":
                    unknown = unknown or frame.get("code") == "unknown_device"
                    if frame.get("code") != "unknown_device":
                        raise RuntimeError(f"subscribe answered {frame!r}")
                elif frame.get("type") == "subscribed":
                    break
            if not unknown and DEVICE in (frame.get("devices") or []):
                return attempts
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not register {DEVICE} within {limit:.0f} s")
            await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(values: list[float]) -> dict[str, float | None]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 3)

    return {
        "p50": ms(percentile(values, 0.50)),
        "p90": ms(percentile(values, 0.90)),
        "p99": ms(percentile(values, 0.99)),
        "max": ms(max(values) if values else None),
        "mean": ms(sum(values) / len(values) if values else None),
    }


# The segments of one round trip, each from one timestamp to the next (all on this machine's clock). The
# gateway's ``ts`` of a state is taken when it starts recording that state (before its transaction).
SEGMENTS = [
    ("client -> web (pending ts)", "client_send", "pending_ts"),
    ("pending ts -> device receives", "pending_ts", "device_rx"),
    ("device receives -> replies", "device_rx", "device_tx"),
    ("device replies -> succeeded ts", "device_tx", "succeeded_ts"),
    ("succeeded ts -> client frame", "succeeded_ts", "client_succeeded"),
]
# Side branches, for splitting the segments above: what the web side takes to store and answer (pending), and
# the publish's acknowledgement seen from the bridge (sent ts, taken after the PUBACK) against the device.
BRANCHES = [
    ("pending ts -> client gets pending", "pending_ts", "client_pending"),
    ("device receives -> sent ts", "device_rx", "sent_ts"),
    ("sent ts -> client gets sent", "sent_ts", "client_sent"),
]


def timeline(tracked: Tracked, device: dict[str, list[Any]]) -> dict[str, float]:
    points = {"client_send": tracked.sent_at}
    for state in STATES:
        if state in tracked.server_ts:
            points[f"{state}_ts"] = tracked.server_ts[state]
        if state in tracked.received:
            points[f"client_{state}"] = tracked.received[state]
    seen = device.get(tracked.command_id or "")
    if seen is not None:
        points["device_rx"], points["device_tx"] = float(seen[0]), float(seen[1])
    return points


@dataclass
class ModeResult:
    case: str
    layer: str
    mode: str
    concurrency: int
    commands: int
    completed: int = 0  # reached succeeded
    failures: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    rtt_ms: dict[str, float | None] = field(default_factory=dict)
    to_sent_ms: dict[str, float | None] = field(default_factory=dict)
    throughput: float | None = None
    seconds: float = 0.0
    breakdown_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    slowest: list[dict[str, Any]] = field(default_factory=list)  # the slowest 1 %, segment by segment
    # Every command, in send order: its request_id and each timeline point in ms after the first send of the mode.
    timelines: list[dict[str, Any]] = field(default_factory=list)
    anomalies: dict[str, int] = field(default_factory=dict)


def evaluate(
    result: ModeResult, runs: list[Tracked], device: dict[str, list[Any]], started: float, ended: float
) -> None:
    failures: Counter[str] = Counter()
    rtts: list[float] = []
    to_sent: list[float] = []
    anomalies: Counter[str] = Counter()
    lines: list[tuple[float, dict[str, float]]] = []
    for tracked in runs:
        if tracked.final != "succeeded":
            label = tracked.final or "no final state"
            if tracked.error:
                label += f" ({tracked.error})"
            failures[label[:120]] += 1
            continue
        rtt = tracked.received["succeeded"] - tracked.sent_at
        rtts.append(rtt)
        if "sent" in tracked.received:
            to_sent.append(tracked.received["sent"] - tracked.sent_at)
        else:
            anomalies["succeeded without a sent frame"] += 1
        firsts = [state for state in dict.fromkeys(tracked.order) if state in STATES]
        if firsts != [state for state in STATES if state in firsts]:
            anomalies[f"frames out of order: {' -> '.join(tracked.order)}"] += 1
        for state, count in tracked.frames.items():
            if count > 1 and state != "pending":  # pending comes twice: the answer to the op, and the event
                anomalies[f"{state} frame received {count} times"] += 1
        seen = device.get(tracked.command_id or "")
        if seen is None:
            anomalies["succeeded, but the device never saw it"] += 1
        elif seen[4]:
            anomalies["device received the command more than once"] += 1
        points = timeline(tracked, device)
        if result.mode == "sequential" and points.get("device_rx", 0) - points.get("pending_ts", 0) > LOST_WAKE:
            anomalies[f"pending -> device over {LOST_WAKE:.1f} s (a lost wake-up waits for the poll)"] += 1
        lines.append((rtt, points))
    result.completed = len(rtts)
    result.failures = len(runs) - len(rtts)
    result.failure_kinds = dict(failures)
    result.rtt_ms = summary_ms(rtts)
    result.to_sent_ms = summary_ms(to_sent)
    result.seconds = round(ended - started, 3)
    if ended > started:
        result.throughput = round(len(rtts) / (ended - started), 1)
    for title, start, end in SEGMENTS + BRANCHES:
        spans = [points[end] - points[start] for _, points in lines if start in points and end in points]
        result.breakdown_ms[title] = summary_ms(spans)
    for tracked in sorted(runs, key=lambda t: t.sent_at):
        offsets = {name: round(1000 * (value - started), 2) for name, value in timeline(tracked, device).items()}
        result.timelines.append({"request_id": tracked.request_id, "final": tracked.final, **offsets})
    lines.sort(key=lambda item: item[0], reverse=True)
    for rtt, points in lines[: max(1, len(lines) // 100)]:
        row: dict[str, Any] = {"rtt_ms": round(1000 * rtt, 2)}
        for title, start, end in SEGMENTS + BRANCHES:
            if start in points and end in points:
                row[title] = round(1000 * (points[end] - points[start]), 2)
        result.slowest.append(row)
    result.anomalies = dict(anomalies)


async def run_sequential(client: Client, count: int, prefix: str, first: int = 0) -> tuple[list[Tracked], float, float]:
    runs = []
    started = time.time()
    for i in range(first, first + count):
        runs.append(await client.command(f"{prefix}-{i}", i))
    return runs, started, time.time()


async def run_concurrent(
    client: Client, count: int, concurrency: int, prefix: str, first: int = 0
) -> tuple[list[Tracked], float, float]:
    runs: list[Tracked] = []
    numbers = iter(range(first, first + count))

    async def worker() -> None:
        for i in numbers:
            runs.append(await client.command(f"{prefix}-{i}", i))

    started = time.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return runs, started, time.time()


@dataclass
class CaseResult:
    layer: str
    modes: list[ModeResult] = field(default_factory=list)
    warmup: dict[str, Any] = field(default_factory=dict)
    subscribe_attempts: int = 0
    device_errors: dict[str, int] = field(default_factory=dict)
    other_frames: dict[str, int] = field(default_factory=dict)
    error_frames: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)  # gap frames, with the phase they came in
    metrics: dict[str, float] = field(default_factory=dict)
    log_problems: dict[str, list[str]] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    died: list[str] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)  # phase -> process -> py-spy summary
    profile_seconds: float = 0.0
    stalls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


async def watch_processes(procs: list[Proc], died: list[str]) -> None:
    """Return as soon as one gateway process exits (recorded in ``died``)."""
    while True:
        dead = [f"{p.name} exited {p.popen.returncode}" for p in procs if not p.alive()]
        if dead:
            died.extend(dead)
            return
        await asyncio.sleep(0.25)


async def guarded(coro: Any, procs: list[Proc], result: CaseResult) -> Any:
    """Run ``coro`` unless a gateway process dies first (then raise)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.create_task(watch_processes(procs, result.died))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise RuntimeError(f"gateway process died during the measurement: {', '.join(result.died)}")
    return task.result()


async def case_gateway(args: argparse.Namespace, layer: str, workdir: Path) -> CaseResult:
    import orjson
    import websockets

    result = CaseResult(layer=layer, profile_seconds=args.profile)
    procs = Processes()
    profilers = {mode: Profiler(args.profile, workdir / mode) for mode in ("sequential", "concurrent")}
    for mode in profilers:
        (workdir / mode).mkdir()
    device: Device | None = None
    client: Client | None = None
    web_port = 0
    try:
        nodelay_broker = args.nodelay in ("broker", "all")
        mqtt_port = start_mosquitto(procs, workdir, extra_config="set_tcp_nodelay true\n" if nodelay_broker else "")
        env = gateway_env(workdir=workdir, mqtt_port=mqtt_port, layer=layer)
        env["GATEWAY_COMMANDS_OFFLINE"] = "reject"  # the default, said explicitly: the device must be online
        env.update(ABUSE_LIMITS_OFF)
        env.update(args.gateway_env)
        device_env = None
        if args.nodelay == "all":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [nodelay_site(workdir), env.get("PYTHONPATH")]))
            device_env = {**os.environ, "PYTHONPATH": env["PYTHONPATH"]}
        if layer == "redis":
            env["REDIS_URL"] = redis_url(args.redis_db)
            flush_redis_db(args.redis_db)
        token = await asyncio.to_thread(prepare_database, env)
        web_port = free_port()
        if layer == "memory":
            argv = [sys.executable, "manage.py", "rungateway", "--bind", f"127.0.0.1:{web_port}"]
            gateway = [procs.start("rungateway", argv, env=env, log=workdir / "rungateway.log")]
        else:
            daphne = [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(web_port), "config.asgi:application"]
            bridge = [sys.executable, "manage.py", "runbridge"]
            gateway = [
                procs.start("daphne", daphne, env=env, log=workdir / "daphne.log"),
                procs.start("runbridge", bridge, env=env, log=workdir / "runbridge.log"),
            ]
        await wait_ready(web_port, gateway)
        device = Device(mqtt_port, workdir, device_env)
        await device.start()

        uri = f"ws://127.0.0.1:{web_port}/ws/?token={token}"
        async with websockets.connect(uri, max_size=16 * 1024 * 1024, ping_interval=None, open_timeout=10) as ws:
            hello = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if hello.get("type") != "hello":
                raise RuntimeError(f"expected a hello frame, got {hello!r}")
            client = Client(ws)
            client.start()
            result.subscribe_attempts = await guarded(client.subscribe_device(), gateway, result)
            # Warm-up: until commands succeed (the device's online status may land just after registration).
            warm: Counter[str] = Counter()
            deadline = time.monotonic() + 30
            succeeded = 0
            i = 0
            while succeeded < WARMUP:
                tracked = await guarded(client.command(f"w-{i}", -1 - i), gateway, result)
                i += 1
                warm[f"{tracked.final}" + (f" ({tracked.error})" if tracked.error else "")] += 1
                if tracked.final == "succeeded":
                    succeeded += 1
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"warm-up commands do not succeed: {dict(warm)}")
                else:
                    await asyncio.sleep(0.1)
            result.warmup = dict(warm)

            stall = asyncio.create_task(stall_watch(client, gateway, result))
            try:
                profilers["sequential"].start(gateway)
                runs, started, ended = await guarded(run_sequential(client, args.commands, "r"), gateway, result)
                result.profile["sequential"] = await asyncio.to_thread(profilers["sequential"].finish)
                sequential = ModeResult(f"{layer} sequential", layer, "sequential", 1, args.commands)
                profilers["concurrent"].start(gateway)
                runs_c, started_c, ended_c = await guarded(
                    run_concurrent(client, args.commands, args.concurrency, "c"), gateway, result
                )
                result.profile["concurrent"] = await asyncio.to_thread(profilers["concurrent"].finish)
                concurrent = ModeResult(
                    f"{layer} concurrent x{args.concurrency}", layer, "concurrent", args.concurrency, args.commands
                )
            finally:
                stall.cancel()
            await client.close()
        await device.stop()
        evaluate(sequential, runs, device.records, started, ended)
        evaluate(concurrent, runs_c, device.records, started_c, ended_c)
        result.modes = [sequential, concurrent]
        result.device_errors = device.errors
        result.other_frames = dict(client.other)
        result.error_frames = client.errors[:20]
        for gap in client.gaps:
            phase = "set-up/warm-up"
            if started <= gap["at"] <= ended:
                phase = "sequential"
            elif started_c <= gap["at"] <= ended_c:
                phase = "concurrent"
            elif gap["at"] > ended_c:
                phase = "after"
            result.gaps.append({**gap, "phase": phase})
        result.metrics = await asyncio.to_thread(read_metrics, web_port)
    except Exception as exc:  # keep what was learnt (logs, exit codes, stalls) beside the error
        result.error = f"{type(exc).__name__}: {exc}"
        if web_port and all(proc.alive() for proc in procs.items):
            result.metrics = await asyncio.to_thread(read_metrics, web_port)
    finally:
        if client is not None:
            await client.close()
        if device is not None and device.proc is not None and device.proc.returncode is None:
            await device.stop()
        for profiler in profilers.values():
            if profiler.runs:
                await asyncio.to_thread(profiler.finish)
        procs.stop_all()
        result.exit_codes = {proc.name: proc.returncode for proc in procs.items}
        result.log_problems = {p.name: found for p in procs.items if (found := log_problems(p))}
    return result


NODELAY_SITE = '''"""From bench/command_rtt.py --nodelay all: TCP_NODELAY on the TCP connections this process opens."""
import socket

_create_connection = socket.create_connection


def _create_connection_nodelay(*args, **kwargs):
    sock = _create_connection(*args, **kwargs)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


socket.create_connection = _create_connection_nodelay
'''


def nodelay_site(workdir: Path) -> str:
    """A directory with a ``sitecustomize`` that disables Nagle's algorithm on the process's TCP connections
    (paho opens its MQTT socket with ``socket.create_connection``): the diagnostic ``--nodelay all``."""
    site = workdir / "nodelay-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NODELAY_SITE)
    return str(site)


async def stall_watch(client: Client, procs: list[Proc], result: CaseResult, after: float = 3.0) -> None:
    """The first time a command has been waiting more than ``after`` s, record py-spy dumps of the gateway."""
    while True:
        await asyncio.sleep(0.5)
        now = time.time()
        waiting = [t for t in client.tracked.values() if t.final is None and now - t.sent_at > after]
        if waiting:
            oldest = min(waiting, key=lambda t: t.sent_at)
            result.stalls.append(
                {
                    "request_id": oldest.request_id,
                    "waiting_s": round(now - oldest.sent_at, 1),
                    "states_seen": sorted(oldest.received),
                    "dumps": await asyncio.to_thread(py_spy_dumps, procs),
                }
            )
            return


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(results: list[CaseResult]) -> str:
    header = ["case", "count", "failures", "p50 ms", "p90 ms", "p99 ms", "max ms", "sent p50", "sent p99", "cmd/s"]
    rows = [header]
    for case in results:
        if case.error:
            rows.append([case.layer, *["-"] * (len(header) - 1)])
            continue
        for m in case.modes:
            rows.append(
                [
                    m.case,
                    str(m.completed),
                    str(m.failures),
                    _ms(m.rtt_ms.get("p50")),
                    _ms(m.rtt_ms.get("p90")),
                    _ms(m.rtt_ms.get("p99")),
                    _ms(m.rtt_ms.get("max")),
                    _ms(m.to_sent_ms.get("p50")),
                    _ms(m.to_sent_ms.get("p99")),
                    "-" if m.throughput is None else f"{m.throughput:,.0f}",
                ]
            )
    return format_rows(rows)


def format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in pairs]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def breakdown_table(mode: ModeResult) -> str:
    rows = [["segment", "p50 ms", "p90 ms", "p99 ms", "max ms", "slowest 1 % (mean ms)"]]

    def add(title: str, label: str) -> None:
        stats = mode.breakdown_ms.get(title, {})
        slow = [row[title] for row in mode.slowest if title in row]
        rows.append(
            [
                label,
                _ms(stats.get("p50")),
                _ms(stats.get("p90")),
                _ms(stats.get("p99")),
                _ms(stats.get("max")),
                _ms(sum(slow) / len(slow) if slow else None),
            ]
        )

    for title, _, _ in SEGMENTS:
        add(title, title)
    slow_rtt = [row["rtt_ms"] for row in mode.slowest]
    rows.append(
        [
            "= round trip",
            _ms(mode.rtt_ms.get("p50")),
            _ms(mode.rtt_ms.get("p90")),
            _ms(mode.rtt_ms.get("p99")),
            _ms(mode.rtt_ms.get("max")),
            _ms(sum(slow_rtt) / len(slow_rtt) if slow_rtt else None),
        ]
    )
    for title, _, _ in BRANCHES:
        add(title, f"  ({title})")
    return format_rows(rows)


def verdicts(results: list[CaseResult]) -> list[str]:
    out = []
    for case in results:
        for m in case.modes:
            p99 = m.rtt_ms.get("p99")
            if m.mode != "sequential" or p99 is None:
                continue
            verdict = "MEETS" if p99 < TARGET_P99_MS else "MISSES"
            out.append(
                f"{m.case}: p99 {p99:.1f} ms {verdict} the target (p99 < {TARGET_P99_MS:.0f} ms,"
                f" {'margin' if p99 < TARGET_P99_MS else 'over by'} {abs(TARGET_P99_MS - p99):.1f} ms)"
            )
    return out


def notes(results: list[CaseResult]) -> list[str]:
    out: list[str] = []
    for r in results:
        if r.error:
            out.append(f"{r.layer}: FAILED: {r.error}")
        for dead in r.died:
            out.append(f"{r.layer}: {dead} DURING the measurement")
        for m in r.modes:
            if m.failure_kinds:
                out.append(f"{m.case}: failures: {m.failure_kinds}")
            if m.anomalies:
                out.append(f"{m.case}: anomalies: {m.anomalies}")
        if r.warmup and set(r.warmup) != {"succeeded"}:
            out.append(f"{r.layer}: warm-up outcomes: {r.warmup}")
        for stall in r.stalls:
            out.append(
                f"{r.layer}: command {stall['request_id']} waited {stall['waiting_s']} s (states seen:"
                f" {stall['states_seen']}); py-spy dumps in the JSON"
            )
        if r.device_errors:
            out.append(f"{r.layer}: device errors: {r.device_errors}")
        if r.other_frames:
            out.append(f"{r.layer}: other frames: {r.other_frames}")
        for gap in r.gaps:
            out.append(
                f"{r.layer}: gap frame (events {gap['from']}-{gap['to']} said lost) during the {gap['phase']} phase"
            )
        if r.error_frames:
            out.append(f"{r.layer}: {len(r.error_frames)} error frame(s), first: {r.error_frames[0]}")
        drops = {
            k: v
            for k, v in r.metrics.items()
            if v
            and any(word in k for word in ("dropped", "lost", "failures", "errors", "retries", "refused"))
            and 'code="unknown_device"' not in k  # the registration poll's, expected
        }
        if drops:
            out.append(f"{r.layer}: gateway counters: {drops}")
        for name, code in r.exit_codes.items():
            if code not in (0, None, -signal.SIGTERM):
                out.append(f"{r.layer}: {name} exited with {code}")
        for name, lines in r.log_problems.items():
            out.append(f"{r.layer}: {len(lines)} notable line(s) in the {name} log, first: {lines[0]}")
    return out


def print_profiles(results: list[CaseResult]) -> None:
    for r in results:
        for mode, processes in r.profile.items():
            for name, summary in processes.items():
                if "error" in summary:
                    print(f"\npy-spy {r.layer} {mode} / {name}: {summary['error']}")
                    continue
                busy = summary["samples"] / (PYSPY_RATE * r.profile_seconds) if r.profile_seconds else 0
                print(
                    f"\npy-spy {r.layer} {mode} / {name}: {summary['samples']} samples, ~{100 * busy:.0f} % of one"
                    f" core over {r.profile_seconds:.0f} s ({summary['file']})"
                )
                print("  self %   function")
                for frame, share in summary["self"][:12]:
                    print(f"  {share:6.1f}  {frame}")


# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--commands", type=int, default=None, help="commands per mode (default 500)")
    parser.add_argument("--concurrency", type=int, default=20, help="commands in flight in the concurrent mode")
    parser.add_argument("--layers", default="memory,redis", help="comma-separated: memory, redis")
    parser.add_argument("--quick", action="store_true", help="100 commands per mode instead of 500")
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy the gateway process(es) for this long from the start of the sequential phase",
    )
    parser.add_argument(
        "--nodelay",
        choices=("off", "broker", "all"),
        default="broker",
        help="Nagle's algorithm: 'broker' (default) runs Mosquitto with set_tcp_nodelay true, as deploy/ recommends "
        "(the gateway sets TCP_NODELAY itself); 'off' shows an untuned broker (~40 ms more per reply); "
        "'all' also forces it in the device process",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="diagnostic: set this in the gateway's environment (repeatable), e.g. GATEWAY_BATCH_LINGER_MS=0",
    )
    parser.add_argument("--redis-db", type=int, default=14, help="Redis db of the redis case (FLUSHED; default 14)")
    parser.add_argument("--rows", default=None, metavar="FILE", help="also write the harness's rows (bench/rows.py)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    args = parser.parse_args(argv)
    if args.commands is None:
        args.commands = 100 if args.quick else 500
    if args.commands < 1:
        parser.error("--commands must be at least 1")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    parse_gateway_env(parser, args)
    parse_layers(parser, args, LAYERS)
    return args


async def main_async(args: argparse.Namespace, tmp: Path) -> list[CaseResult]:
    return await run_cases(
        tmp,
        [(layer, functools.partial(case_gateway, args, layer)) for layer in args.layers],
        f"{args.commands:,} commands sequential, then {args.concurrency} in flight",
        lambda layer, error: CaseResult(layer=layer, error=error),
    )


def row_case(layer: str, mode: str, concurrency: int) -> str:
    return f"{layer} sequential" if mode == "sequential" else f"{layer}, {concurrency} in flight"


def to_rows(results: list[CaseResult], args: argparse.Namespace, cpu: dict[str, Any]) -> list[Row]:
    """The harness's rows (bench/rows.py): one per layer and mode, in the "commands" section."""
    rows: list[Row] = []
    is_diagnostic = diagnostic(args)
    for case in results:
        if case.error and not case.modes:
            for mode, concurrency in (("sequential", 1), ("concurrent", args.concurrency)):
                rows.append(
                    Row(
                        section="commands",
                        case=row_case(case.layer, mode, concurrency),
                        notes=notes([case]),
                        error=case.error,
                    )
                )
            continue
        for m in case.modes:
            notes_: list[str] = []
            if m.mode == "sequential" and m.rtt_ms.get("p99") is not None:
                p99 = m.rtt_ms["p99"]
                assert p99 is not None
                verdict = "meets" if p99 < TARGET_P99_MS else "MISSES"
                notes_.append(f"p99 {p99:.1f} ms {verdict} the target (p99 < {TARGET_P99_MS:.0f} ms)")
            if m.failure_kinds:
                notes_.append(f"failures: {m.failure_kinds}")
            if m.anomalies:
                notes_.append(f"anomalies: {m.anomalies}")
            if is_diagnostic:
                notes_.append(f"DIAGNOSTIC run: --nodelay {args.nodelay}; gateway environment {args.gateway_env}")
            if cpu["others_share"] > 0.05:
                notes_.append(
                    f"other processes used {100 * cpu['others_share']:.0f} % of the machine during the run:"
                    " noisier figures"
                )
            rows.append(
                Row(
                    section="commands",
                    case=row_case(case.layer, m.mode, m.concurrency),
                    rate=m.throughput,
                    p50_ms=m.rtt_ms.get("p50"),
                    p99_ms=m.rtt_ms.get("p99"),
                    ratio_base=None,
                    extra={"failures": m.failures},
                    notes=notes_,
                    error=case.error,
                )
            )
    return rows


def diagnostic(args: argparse.Namespace) -> bool:
    """A run with settings other than the deployed ones (Mosquitto with TCP_NODELAY, the gateway as configured)."""
    return args.nodelay != "broker" or bool(args.gateway_env)


def result_file(args: argparse.Namespace) -> Path:
    """``command_rtt.json`` for the gateway as configured; a diagnostic run (``--nodelay``, ``--gateway-env``)
    goes to ``command_rtt-diagnostic.json`` so that it does not replace the reference figures."""
    if diagnostic(args):
        return RESULTS_DIR / "command_rtt-diagnostic.json"
    return RESULT_FILE


def main(argv: list[str]) -> int:
    if argv[:1] == ["_device"]:
        return run_device(argv[1:])
    args = parse_args(argv)
    results, tmp, started, cpu_before = run_in_tempdir(args, main_async, prefix="gw-bench-rtt-")
    print()
    print(
        f"Command round trip WebSocket -> gateway -> device -> gateway -> WebSocket, {args.commands:,} commands per"
        f" mode, one device, QoS 1 ({os.cpu_count()} CPUs)"
    )
    print("round trip = client send -> client receives the succeeded frame; sent = client send -> the sent frame")
    if diagnostic(args):
        print(f"DIAGNOSTIC run: --nodelay {args.nodelay}; gateway environment {args.gateway_env or 'as usual'}")
    print(table(results))
    for line in verdicts(results):
        print(f"target: {line}")
    cpu = cpu_report(cpu_before, cpu_seconds())
    print_cpu_note(cpu)
    for line in notes(results):
        print(f"note: {line}")
    for case in results:
        for mode in case.modes:
            if mode.completed:
                print(f"\nwhere the time goes: {mode.case} (gateway ts = its receive time of each state change)")
                print(breakdown_table(mode))
    print_profiles(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "args": dict(vars(args)),
        "diagnostic": {"nodelay": args.nodelay, "gateway_env": args.gateway_env},
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "versions": versions(),
        "target_p99_ms": TARGET_P99_MS,
        "tmp": str(tmp) if args.keep else None,
        "segments": [{"title": t, "from": a, "to": b} for t, a, b in SEGMENTS + BRANCHES],
        "results": [
            {**{k: v for k, v in r.__dict__.items() if k != "modes"}, "modes": [m.__dict__ for m in r.modes]}
            for r in results
        ],
    }
    out = result_file(args)
    out.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nwritten: {out}  ({time.monotonic() - started:.0f} s in all)")
    if args.rows:
        write_rows(args.rows, to_rows(results, args, cpu))
        print(f"rows: {args.rows}")
    if args.keep:
        print(f"kept: {tmp}")
    failed = any(r.error for r in results) or any(m.failures for r in results for m in r.modes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
