#!/usr/bin/env python
"""Memory per idle WebSocket connection, and how many idle connections one web process holds (up to 10,000).

For each channel layer, against its own Mosquitto and a fresh SQLite database (helpers of ``mqtt_to_ws.py``):

* ``memory``: ``manage.py rungateway`` (Daphne + bridge in one process, in-memory channel layer).
* ``redis``: ``daphne config.asgi:application`` (the measured web process) and ``manage.py runbridge``, joined by
  Redis (db ``--redis-db``, default 14, flushed at the start of the case).

The client (this process, asyncio + ``websockets``) opens idle authenticated sockets in steps (0, 10 %, 25 %, 50 %
and 100 % of ``--max``); each one reads ``hello``, subscribes to the device ``dev-00001`` and then only answers
Daphne's keep-alive pings. After each step, once the server has settled, it reads the web process's RSS (and PSS,
open fds, threads, CPU). KiB per socket = the least-squares slope of RSS over sockets. At the end, one MQTT message
to ``dev-00001`` must reach every held socket, and every socket must answer a ``ping`` op. See bench/README.md.

    python bench/idle_ws.py [--max N] [--quick] [--layers memory,redis] [--redis-db DB] [--rows FILE]
                            [--steps 0,1000,...] [--settle SECONDS] [--concurrency C] [--keep]
                            [--tracemalloc] [--gateway-env NAME=VALUE ...]          # diagnostics
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import json
import os
import re
import resource
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqtt_to_ws import (
    BIN,
    PREFIX,
    RESULTS_DIR,
    ROOT,
    Proc,
    Processes,
    cpu_report,
    cpu_seconds,
    flush_redis_db,
    free_port,
    gateway_env,
    log_problems,
    manage,
    parse_gateway_env,
    parse_layers,
    prepare_database,
    print_cpu_note,
    read_metrics,
    redis_url,
    run_cases,
    run_in_tempdir,
    start_mosquitto,
    versions,
    wait_ready,
)
from rows import Row, write_rows

DEVICE = "dev-00001"
TARGET_KIB = 64.0  # the target: at most 64 KiB per idle WebSocket
STEP_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 1.0)
OPEN_TIMEOUT = 30.0  # TCP connect + WebSocket handshake (authentication included)
FRAME_TIMEOUT = 30.0  # hello, subscribed, the fan-out event, pong
FD_MARGIN = 200  # fds the client (and the server) need besides the sockets
# A step stops opening sockets once this many failed in it (and the ramp stops there).
MAX_FAILURES = 50
DRAIN_LIMIT = 120.0  # s: the longest wait for the server to handle the disconnects of every socket closed at once
CASE_NAMES = {"memory": "memory layer (rungateway)", "redis": "redis layer (daphne)"}
# Settings in config/settings.py that could cap sockets per user or per process: each one found is raised out of
# the way (none exist at the time of writing; the per-socket limits do not matter to an idle socket).
CAP_SETTING = re.compile(r'"(GATEWAY_[A-Z0-9_]*(?:CONNECTIONS|SOCKETS|CLIENTS)[A-Z0-9_]*)"')
CAP_VALUE = "1000000"


# ----------------------------------------------------------------------------------------------------
# Limits and /proc
# ----------------------------------------------------------------------------------------------------


def raise_fd_limit() -> dict[str, int]:
    """Soft RLIMIT_NOFILE up to the hard limit, in this process; the gateway and Mosquitto inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": soft, "soft": new_soft, "hard": new_hard}


def _status_kib(text: str, key: str) -> int | None:
    match = re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def process_sample(pid: int) -> dict[str, Any]:
    """RSS, RssAnon, VmHWM (KiB), threads and open fds from /proc/PID/status and fd/; PSS from smaps_rollup."""
    status = Path(f"/proc/{pid}/status").read_text()
    sample: dict[str, Any] = {
        "rss_kib": _status_kib(status, "VmRSS"),
        "rss_anon_kib": _status_kib(status, "RssAnon"),
        "hwm_kib": _status_kib(status, "VmHWM"),
        "threads": _status_kib(status, "Threads"),
        "pss_kib": None,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }
    with contextlib.suppress(OSError):
        sample["pss_kib"] = _status_kib(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")
    return sample


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fit_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


# ----------------------------------------------------------------------------------------------------
# The tracemalloc diagnostic: a sitecustomize in the gateway that dumps a snapshot on SIGUSR2
# ----------------------------------------------------------------------------------------------------

TRACEMALLOC_SITE = '''"""From bench/idle_ws.py --tracemalloc: trace allocations; SIGUSR2 dumps a snapshot."""
import os
import signal
import tracemalloc

tracemalloc.start(int(os.environ.get("IDLE_WS_TRACEMALLOC_FRAMES", "8")))
_taken = [0]


def _dump(signum, frame):
    _taken[0] += 1
    path = os.path.join(os.environ["IDLE_WS_SNAPSHOTS"], "snapshot-%d-%d.pickle" % (os.getpid(), _taken[0]))
    tracemalloc.take_snapshot().dump(path + ".tmp")
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGUSR2, _dump)
'''


def tracemalloc_site(workdir: Path) -> tuple[str, Path]:
    site = workdir / "tracemalloc-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(TRACEMALLOC_SITE)
    snapshots = workdir / "snapshots"
    snapshots.mkdir(exist_ok=True)
    return str(site), snapshots


async def take_snapshot(proc: Proc, directory: Path, number: int, limit: float = 300.0) -> Path:
    """Ask the gateway process for its ``number``-th tracemalloc snapshot and wait until it is written."""
    path = directory / f"snapshot-{proc.pid}-{number}.pickle"
    os.kill(proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline or not proc.alive():
            raise RuntimeError(f"no tracemalloc snapshot from {proc.name} within {limit:.0f} s")
        await asyncio.sleep(0.2)
    return path


def _trim(name: str) -> str:
    marker = "site-packages/"
    if marker in name:
        return name[name.index(marker) + len(marker) :]
    root = str(ROOT) + "/"
    return name[len(root) :] if name.startswith(root) else name


def _package(filename: str) -> str:
    trimmed = _trim(filename)
    if trimmed.startswith("/"):  # the standard library
        parts = trimmed.split("/")
        return "stdlib " + (parts[-2] if parts[-1] == "__init__.py" else parts[-1].removesuffix(".py"))
    return trimmed.split("/")[0].removesuffix(".py")


def compare_snapshots(before: Path, after: Path, sockets: int, top: int = 30) -> dict[str, Any]:
    """What the sockets added between two snapshots, per socket: by allocation line, by package, by caller."""
    import tracemalloc

    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    per = max(1, sockets)
    lines = new.compare_to(old, "lineno")
    by_package: Counter[str] = Counter()
    by_count: Counter[str] = Counter()
    for stat in lines:
        frame = stat.traceback[0]
        by_package[_package(frame.filename)] += stat.size_diff
        by_count[_package(frame.filename)] += stat.count_diff
    # The first frame of each traceback outside the standard library and asyncio: who asked for the memory.
    callers: Counter[str] = Counter()
    for stat in new.compare_to(old, "traceback"):
        owner = next(
            (f for f in stat.traceback if "site-packages/" in f.filename or f.filename.startswith(str(ROOT))),
            stat.traceback[0],
        )
        callers[f"{_trim(owner.filename)}:{owner.lineno}"] += stat.size_diff
    total = sum(stat.size_diff for stat in lines)
    return {
        "sockets": sockets,
        "traced_kib_per_socket": round(total / per / 1024, 2),
        "by_line": [
            {
                "where": f"{_trim(stat.traceback[0].filename)}:{stat.traceback[0].lineno}",
                "bytes_per_socket": round(stat.size_diff / per),
                "blocks_per_socket": round(stat.count_diff / per, 2),
            }
            for stat in lines[:top]
        ],
        "by_package": [
            {
                "package": name,
                "bytes_per_socket": round(size / per),
                "blocks_per_socket": round(by_count[name] / per, 2),
            }
            for name, size in by_package.most_common(top)
        ],
        "by_caller": [
            {"where": where, "bytes_per_socket": round(size / per)} for where, size in callers.most_common(top)
        ],
    }


# ----------------------------------------------------------------------------------------------------
# The client: many idle sockets in one asyncio process
# ----------------------------------------------------------------------------------------------------


def failure_kind(exc: BaseException) -> str:
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

    if isinstance(exc, InvalidStatus):
        return f"refused: HTTP {exc.response.status_code}"
    if isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd is not None else None
        return f"closed by the server (code {code})"
    if isinstance(exc, InvalidHandshake):
        return f"handshake: {type(exc).__name__}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        if exc.errno == errno.EMFILE:
            return "client out of fds (EMFILE)"
        if exc.errno == errno.ECONNREFUSED:
            return "refused: connection refused"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "client out of ephemeral ports (EADDRNOTAVAIL)"
        if exc.errno == errno.ECONNRESET:
            return "connection reset"
        return f"OSError errno {exc.errno}"
    return f"{type(exc).__name__}: {str(exc)[:100]}"


class Pool:
    """The held sockets."""

    def __init__(self, uri: str, concurrency: int) -> None:
        self.uri = uri
        self.concurrency = concurrency
        self.held: list[Any] = []
        self.extensions: str | None = None  # what the server accepted of the client's offer

    async def open_one(self) -> Any:
        import orjson
        import websockets

        ws = await websockets.connect(
            self.uri, ping_interval=None, open_timeout=OPEN_TIMEOUT, close_timeout=2, proxy=None, max_queue=4
        )
        try:
            hello = orjson.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
            if hello.get("type") != "hello":
                raise RuntimeError(f"expected hello, got {str(hello)[:200]}")
            await ws.send(orjson.dumps({"op": "subscribe", "devices": [DEVICE]}).decode())
            while True:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
                if frame.get("type") == "error":
                    raise RuntimeError(f"subscribe answered error {frame.get('code')}")
                if frame.get("type") == "subscribed":
                    if DEVICE not in (frame.get("devices") or []):
                        raise RuntimeError(f"subscribed without {DEVICE}: {str(frame)[:200]}")
                    break
        except BaseException:
            ws.transport.abort()
            raise
        if self.extensions is None and ws.response is not None:
            self.extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        return ws

    async def open_many(self, count: int) -> tuple[int, Counter[str], float]:
        """Open ``count`` more sockets, ``concurrency`` at a time; stop after ``MAX_FAILURES`` failures.

        Returns (opened, failures by kind, seconds)."""
        failures: Counter[str] = Counter()
        left = count
        opened = 0
        started = time.monotonic()

        async def worker() -> None:
            nonlocal left, opened
            while left > 0 and sum(failures.values()) < MAX_FAILURES:
                left -= 1
                try:
                    ws = await self.open_one()
                except Exception as exc:
                    failures[failure_kind(exc)] += 1
                    continue
                self.held.append(ws)
                opened += 1

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, max(1, count)))))
        return opened, failures, time.monotonic() - started

    def closed(self) -> Counter[str]:
        """Held sockets that are no longer open, by close code."""
        from websockets.protocol import State

        gone: Counter[str] = Counter()
        for ws in self.held:
            if ws.state is not State.OPEN:
                gone[f"closed (code {ws.close_code})"] += 1
        return gone

    def abort_all(self) -> None:
        for ws in self.held:
            with contextlib.suppress(Exception):
                ws.transport.abort()
        self.held.clear()


async def register_device(mqtt_port: int, pool: Pool) -> int:
    """Publish one telemetry message for ``DEVICE`` (auto-registration) and wait until a socket can subscribe."""
    import aiomqtt
    import orjson
    import websockets

    async with aiomqtt.Client("127.0.0.1", mqtt_port, identifier=f"idle-ws-{uuid.uuid4().hex[:8]}") as client:
        await client.publish(f"{PREFIX}/{DEVICE}/telemetry", orjson.dumps({"ts": time.time(), "n": -1}), qos=1)
    deadline = time.monotonic() + 30
    attempts = 0
    async with websockets.connect(pool.uri, ping_interval=None, open_timeout=OPEN_TIMEOUT, proxy=None) as ws:
        hello = orjson.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
        if hello.get("type") != "hello":
            raise RuntimeError(f"expected a hello frame, got {hello!r}")
        while True:
            attempts += 1
            await ws.send(orjson.dumps({"op": "subscribe", "devices": [DEVICE]}).decode())
            unknown = False
            while True:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
                if frame.get("type") == "error":
                    unknown = unknown or frame.get("code") == "unknown_device"
                elif frame.get("type") == "subscribed":
                    break
            if not unknown:
                return attempts
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not register {DEVICE} within 30 s")
            await asyncio.sleep(0.2)


def _events_of(raw: str | bytes) -> list[dict[str, Any]]:
    import orjson

    frame = orjson.loads(raw)
    items = frame.get("events", []) if frame.get("type") == "batch" else [frame]
    return [orjson.loads(item) if isinstance(item, str) else item for item in items]


async def check_held(pool: Pool, mqtt_port: int) -> dict[str, Any]:
    """One MQTT message to ``DEVICE`` must reach every held socket; then every socket must answer a ``ping``."""
    import aiomqtt
    import orjson

    marker = int(time.time() * 1000)
    arrived: list[float | None] = [None] * len(pool.held)
    problems: Counter[str] = Counter()

    async def wait_event(index: int, ws: Any) -> None:
        deadline = time.monotonic() + FRAME_TIMEOUT
        try:
            while True:
                raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
                now = time.time()
                if any(event.get("values", {}).get("n") == marker for event in _events_of(raw)):
                    arrived[index] = now
                    return
                problems["other frames before the event"] += 1
        except Exception as exc:
            problems[f"event: {failure_kind(exc)}"] += 1

    waiters = [asyncio.create_task(wait_event(i, ws)) for i, ws in enumerate(pool.held)]
    await asyncio.sleep(0.2)  # every waiter is in recv()
    published = time.time()
    async with aiomqtt.Client("127.0.0.1", mqtt_port, identifier=f"idle-ws-{uuid.uuid4().hex[:8]}") as client:
        payload = orjson.dumps({"ts": published, "n": marker, "temperature": 21.5})
        await client.publish(f"{PREFIX}/{DEVICE}/telemetry", payload, qos=1)
    await asyncio.gather(*waiters)
    delays = sorted(at - published for at in arrived if at is not None)

    ponged = [False] * len(pool.held)

    async def ping(index: int, ws: Any) -> None:
        try:
            await ws.send('{"op":"ping"}')
            deadline = time.monotonic() + FRAME_TIMEOUT
            while True:
                raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
                if orjson.loads(raw).get("type") == "pong":
                    ponged[index] = True
                    return
                problems["other frames before the pong"] += 1
        except Exception as exc:
            problems[f"ping: {failure_kind(exc)}"] += 1

    ping_started = time.monotonic()
    await asyncio.gather(*(ping(i, ws) for i, ws in enumerate(pool.held)))
    ping_seconds = time.monotonic() - ping_started

    def ms(q: float) -> float | None:
        return round(1000 * delays[min(len(delays) - 1, int(q * len(delays)))], 1) if delays else None

    return {
        "sockets": len(pool.held),
        "event_received": len(delays),
        "pong_received": sum(ponged),
        "held": sum(1 for got, pong in zip(arrived, ponged, strict=True) if got is not None and pong),
        "fanout_ms": {"first": ms(0.0), "p50": ms(0.5), "p99": ms(0.99), "last": ms(1.0)},
        "ping_all_s": round(ping_seconds, 2),
        "problems": dict(problems),
    }


# ----------------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    layer: str
    case: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    kib_per_socket_fit: float | None = None
    kib_per_socket_last: float | None = None
    anon_kib_per_socket_fit: float | None = None  # the same slope for RssAnon (the process's private heap)
    pss_kib_per_socket_fit: float | None = None
    held: int = 0
    opened: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    stopped_early: str | None = None
    check: dict[str, Any] = field(default_factory=dict)
    # After the end check: all closed; unless --no-reopen, the same number opened again, and all closed again.
    after: list[dict[str, Any]] = field(default_factory=list)
    reopen_failures: dict[str, int] = field(default_factory=dict)
    # Daphne's warnings that an application instance took too long to end after its socket closed (it cancels it),
    # and how many distinct instances they named.
    killed_on_close: tuple[int, int] = (0, 0)
    extensions: str | None = None
    bridge: dict[str, Any] = field(default_factory=dict)  # the redis case's runbridge process, for reference
    cap_settings: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tracemalloc: dict[str, Any] = field(default_factory=dict)
    log_problems: dict[str, list[str]] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    died: list[str] = field(default_factory=list)
    error: str | None = None


GRANTS_SCRIPT = """
from django.contrib.auth.models import Group, User
from devices.models import Device, Fleet, FleetAccess

count = {count}
ids = ["dev-%05d" % n for n in range(1, count + 1)]
Device.objects.bulk_create([Device(id=device_id) for device_id in ids], ignore_conflicts=True)
fleet = Fleet.objects.create(name="bench-fleet")
fleet.devices.add(*ids)
group = Group.objects.create(name="bench-viewers")
FleetAccess.objects.create(fleet=fleet, group=group, level=FleetAccess.Level.OPERATE)
user = User.objects.create_user(username="viewer", password=None)
user.groups.add(group)
"""


def prepare_viewer(env: dict[str, str], count: int) -> str:
    """An ordinary user whose group may operate a fleet of ``count`` devices (dev-00001 ...); returns its token."""
    manage(env, "shell", "-c", GRANTS_SCRIPT.format(count=count))
    token = manage(env, "issue_token", "viewer").strip().splitlines()[-1].strip()
    if not token or " " in token:
        raise RuntimeError(f"issue_token printed no token: {token!r}")
    return token


def case_name(layer: str, args: argparse.Namespace) -> str:
    if args.grants:
        return f"{CASE_NAMES[layer]}, user granted {args.grants:,} devices"
    return CASE_NAMES[layer]


def steps_for(args: argparse.Namespace) -> list[int]:
    if args.steps:
        return list[int](args.steps)
    return sorted({round(args.max * fraction) for fraction in STEP_FRACTIONS})


def cap_settings() -> dict[str, str]:
    """Every setting of config/settings.py that looks like a cap on sockets per user or per process, raised."""
    text = (ROOT / "config" / "settings.py").read_text()
    return {name: CAP_VALUE for name in sorted(set(CAP_SETTING.findall(text)))}


async def settle_and_sample(proc: Proc, seconds: float) -> dict[str, Any]:
    """Wait for the process to settle, then sample it; CPU over the settle window (what idle sockets cost)."""
    await asyncio.sleep(1.0)  # the last handshakes' work, the access watcher's next round
    cpu_before, wall_before = process_cpu_s(proc.pid), time.monotonic()
    rss: list[int] = []
    deadline = wall_before + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        rss.append(process_sample(proc.pid)["rss_kib"] or 0)
    sample = process_sample(proc.pid)
    elapsed = time.monotonic() - wall_before
    sample["idle_cpu_pct"] = round(100 * (process_cpu_s(proc.pid) - cpu_before) / elapsed, 1)
    sample["rss_spread_kib"] = max(rss) - min(rss) if rss else 0
    return sample


async def case_gateway(args: argparse.Namespace, layer: str, workdir: Path) -> CaseResult:
    result = CaseResult(layer=layer, case=case_name(layer, args))
    procs = Processes()
    pool: Pool | None = None
    web_port = 0
    snapshots: list[tuple[int, Path]] = []
    try:
        mqtt_port = start_mosquitto(procs, workdir)
        env = gateway_env(workdir=workdir, mqtt_port=mqtt_port, layer=layer)
        result.cap_settings = cap_settings()
        env.update(result.cap_settings)
        env.update(args.gateway_env)
        snapshot_dir: Path | None = None
        if args.tracemalloc:
            site, snapshot_dir = tracemalloc_site(workdir)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
            env["IDLE_WS_SNAPSHOTS"] = str(snapshot_dir)
        if layer == "redis":
            env["REDIS_URL"] = redis_url(args.redis_db)
            flush_redis_db(args.redis_db)
        token = await asyncio.to_thread(prepare_database, env)
        if args.grants:
            token = await asyncio.to_thread(prepare_viewer, env, args.grants)
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
        web = gateway[0]
        await wait_ready(web_port, gateway)
        pool = Pool(f"ws://127.0.0.1:{web_port}/ws/?token={token}", args.concurrency)
        await register_device(mqtt_port, pool)  # (also warms the consumer path: hub, access watcher, imports)

        for target in steps_for(args):
            dead = [f"{p.name} exited {p.popen.returncode}" for p in gateway if not p.alive()]
            if dead:
                result.died.extend(dead)
                raise RuntimeError(f"gateway process died: {', '.join(dead)}")
            opened, failures, seconds = await pool.open_many(max(0, target - len(pool.held)))
            result.opened += opened
            for kind, count in failures.items():
                result.failures[kind] = result.failures.get(kind, 0) + count
            closed = pool.closed()
            sample = await settle_and_sample(web, args.settle)
            sample.update(
                target=target,
                sockets=len(pool.held) - sum(closed.values()),
                opened=opened,
                open_s=round(seconds, 2),
                sockets_per_s=round(opened / seconds, 1) if opened and seconds > 0 else None,
                failures=dict(failures),
                closed=dict(closed),
            )
            gauge = (await asyncio.to_thread(read_metrics, web_port)).get("gateway_ws_clients")
            sample["gateway_ws_clients"] = gauge
            if snapshot_dir is not None and (target == 0 or target == steps_for(args)[-1]):
                snapshots.append((sample["sockets"], await take_snapshot(web, snapshot_dir, len(snapshots) + 1)))
            result.steps.append(sample)
            print(
                f"  {sample['sockets']:>6,} sockets  RSS {sample['rss_kib'] / 1024:7.1f} MiB  fds {sample['fds']:>6,}"
                f"  idle CPU {sample['idle_cpu_pct']:5.1f} %  opened {opened:,} in {seconds:.1f} s"
                + (f"  failures {dict(failures)}" if failures else ""),
                flush=True,
            )
            if sum(failures.values()) >= MAX_FAILURES:
                result.stopped_early = f"stopped at {len(pool.held):,} sockets: {dict(failures)}"
                break

        points = [(float(s["sockets"]), float(s["rss_kib"])) for s in result.steps]
        result.kib_per_socket_fit = fit_slope(points)
        anon = [(float(s["sockets"]), float(s["rss_anon_kib"])) for s in result.steps if s["rss_anon_kib"]]
        result.anon_kib_per_socket_fit = fit_slope(anon)
        pss = [(float(s["sockets"]), float(s["pss_kib"])) for s in result.steps if s["pss_kib"] is not None]
        result.pss_kib_per_socket_fit = fit_slope(pss)
        first, last = result.steps[0], result.steps[-1]
        if last["sockets"] > first["sockets"]:
            result.kib_per_socket_last = (last["rss_kib"] - first["rss_kib"]) / (last["sockets"] - first["sockets"])
        if len(gateway) > 1 and gateway[1].alive():
            result.bridge = process_sample(gateway[1].pid)

        result.check = await check_held(pool, mqtt_port)
        result.held = result.check["held"]
        result.metrics = await asyncio.to_thread(read_metrics, web_port)
        if len(snapshots) == 2:
            (before_n, before), (after_n, after) = snapshots
            result.tracemalloc = await asyncio.to_thread(compare_snapshots, before, after, after_n - before_n)

        after_n = len(pool.held)
        await close_and_sample(pool, web, web_port, args.settle, result, "all closed")
        if args.reopen and after_n:
            opened, failures, seconds = await pool.open_many(after_n)
            result.reopen_failures = dict(failures)
            sample = await settle_and_sample(web, args.settle)
            sample.update(label=f"{opened:,} reopened", sockets=opened, open_s=round(seconds, 2))
            sample["gateway_ws_clients"] = (await asyncio.to_thread(read_metrics, web_port)).get("gateway_ws_clients")
            result.after.append(sample)
            print(
                f"  {opened:>6,} reopened  RSS {sample['rss_kib'] / 1024:7.1f} MiB  fds {sample['fds']:>6,}", flush=True
            )
            await close_and_sample(pool, web, web_port, args.settle, result, "closed again")
        if snapshot_dir is not None and after_n:
            closed_snapshot = await take_snapshot(web, snapshot_dir, len(snapshots) + 1)
            retained = await asyncio.to_thread(compare_snapshots, snapshots[0][1], closed_snapshot, after_n)
            result.tracemalloc["retained_after_close"] = retained
    except Exception as exc:  # keep what was learnt (steps, logs, exit codes) beside the error
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if pool is not None:
            result.extensions = pool.extensions
            pool.abort_all()
        procs.stop_all()
        if procs.items[1:]:
            result.killed_on_close = killed_on_close(procs.items[1])  # the web process (after Mosquitto)
        result.exit_codes = {proc.name: proc.returncode for proc in procs.items}
        result.log_problems = {p.name: found for p in procs.items if (found := log_problems(p))}
    return result


async def close_and_sample(pool: Pool, web: Proc, web_port: int, settle: float, result: CaseResult, label: str) -> None:
    """Drop every held socket at once (the client aborts its connections), wait until the server has handled every
    disconnect (``gateway_ws_clients`` back to 0, at most ``DRAIN_LIMIT`` s), let it settle, sample it."""
    closing = len(pool.held)
    cpu_before = process_cpu_s(web.pid)
    started = time.monotonic()
    pool.abort_all()
    gauge: float | None = None
    while time.monotonic() - started < DRAIN_LIMIT:
        await asyncio.sleep(0.25)
        # (None: /metrics did not answer, which a busy process may not within urllib's 5 s: keep waiting)
        gauge = (await asyncio.to_thread(read_metrics, web_port)).get("gateway_ws_clients")
        if gauge == 0:
            break
    drain_s = time.monotonic() - started
    drain_cpu = process_cpu_s(web.pid) - cpu_before
    sample = await settle_and_sample(web, settle)
    sample.update(label=label, sockets=0, closed=closing, drain_s=round(drain_s, 1), drain_cpu_s=round(drain_cpu, 1))
    sample["gateway_ws_clients"] = (await asyncio.to_thread(read_metrics, web_port)).get("gateway_ws_clients")
    sample["gateway_ws_clients_at_drain"] = gauge
    result.after.append(sample)
    print(
        f"  {label:>14}  RSS {sample['rss_kib'] / 1024:7.1f} MiB  fds {sample['fds']:>6,}  disconnects handled in"
        f" {drain_s:.1f} s ({drain_cpu:.1f} CPU-s)",
        flush=True,
    )


KILLED = re.compile(r"Application instance <Task \S+ name='([^']+)'.*took too long to shut down and was killed")


def killed_on_close(proc: Proc) -> tuple[int, int]:
    """Daphne's "took too long to shut down and was killed" warnings in a process's log: (warnings, distinct
    application instances). Daphne warns (and cancels again) every second until a cancelled instance has ended."""
    try:
        names = KILLED.findall(proc.log.read_text(errors="replace"))
    except OSError:
        return 0, 0
    return len(names), len(set(names))


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ",.1f") -> str:
    return "-" if value is None else format(value, fmt)


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


def table(results: list[CaseResult]) -> str:
    header = ["case", "held", "KiB/socket", "(last/N)", "anon KiB/socket", "RSS MiB at 0", "at max", "fds at max"]
    header += ["idle CPU % at max", "sockets/s", "fan-out ms (last)"]
    rows = [header]
    for r in results:
        if not r.steps:
            rows.append([r.case, *["-"] * (len(header) - 1)])
            continue
        first, last = r.steps[0], r.steps[-1]
        rates = [s["sockets_per_s"] for s in r.steps if s.get("sockets_per_s")]
        rows.append(
            [
                r.case,
                f"{r.held:,}" if r.check else "-",
                _num(r.kib_per_socket_fit),
                _num(r.kib_per_socket_last),
                _num(r.anon_kib_per_socket_fit),
                _num(first["rss_kib"] / 1024),
                _num(last["rss_kib"] / 1024),
                f"{last['fds']:,}",
                _num(last["idle_cpu_pct"]),
                _num(min(rates) if rates else None, ",.0f") + "-" + _num(max(rates) if rates else None, ",.0f"),
                _num((r.check.get("fanout_ms") or {}).get("last")),
            ]
        )
    return format_rows(rows)


def steps_table(r: CaseResult) -> str:
    rows = [
        [
            "sockets",
            "RSS MiB",
            "PSS MiB",
            "RssAnon MiB",
            "fds",
            "threads",
            "idle CPU %",
            "opened/closed in s",
            "clients",
        ]
    ]
    for s in r.steps:
        rows.append(
            [
                f"{s['sockets']:,}",
                _num(s["rss_kib"] / 1024),
                _num(s["pss_kib"] / 1024 if s["pss_kib"] is not None else None),
                _num(s["rss_anon_kib"] / 1024 if s["rss_anon_kib"] is not None else None),
                f"{s['fds']:,}",
                str(s["threads"]),
                _num(s["idle_cpu_pct"]),
                _num(s["open_s"]),
                _num(s.get("gateway_ws_clients"), ",.0f"),
            ]
        )
    for a in r.after:
        rows.append(
            [
                a["label"],
                _num(a["rss_kib"] / 1024),
                _num(a["pss_kib"] / 1024 if a["pss_kib"] is not None else None),
                _num(a["rss_anon_kib"] / 1024 if a["rss_anon_kib"] is not None else None),
                f"{a['fds']:,}",
                str(a["threads"]),
                _num(a["idle_cpu_pct"]),
                _num(a.get("open_s", a.get("drain_s"))),
                _num(a.get("gateway_ws_clients"), ",.0f"),
            ]
        )
    return format_rows(rows)


def notes_for(r: CaseResult, args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if r.error:
        out.append(f"FAILED: {r.error}")
    for dead in r.died:
        out.append(f"{dead} during the run")
    if r.kib_per_socket_fit is not None:
        verdict = "meets" if r.kib_per_socket_fit <= TARGET_KIB else "MISSES"
        out.append(f"{r.kib_per_socket_fit:.1f} KiB/socket {verdict} the target (<= {TARGET_KIB:.0f} KiB)")
    if r.steps and r.steps[-1]["sockets"] < args.max:
        out.append(f"held {r.steps[-1]['sockets']:,} of the {args.max:,} asked for")
    if r.stopped_early:
        out.append(r.stopped_early)
    if r.failures:
        out.append(f"failures while opening: {r.failures}")
    for s in r.steps:
        if s["closed"]:
            out.append(f"closed by the server while held (by {s['sockets']:,} sockets): {s['closed']}")
        gauge = s.get("gateway_ws_clients")
        if gauge is not None and int(gauge) != s["sockets"]:
            out.append(f"gateway_ws_clients {gauge:.0f} at {s['sockets']:,} held sockets")
    c = r.check
    if c:
        fanout = c["fanout_ms"]
        out.append(
            f"end check: the event reached {c['event_received']:,}/{c['sockets']:,} sockets (first {fanout['first']}"
            f" ms, p50 {fanout['p50']} ms, last {fanout['last']} ms after the MQTT publish); {c['pong_received']:,}"
            f" answered a ping op (all within {c['ping_all_s']} s)"
        )
        if c["problems"]:
            out.append(f"end check problems: {c['problems']}")
    if r.after and r.steps:
        first, peak = r.steps[0], r.steps[-1]
        for a in r.after:
            line = (
                f"{a['label']}: RSS {a['rss_kib'] / 1024:.1f} MiB ({(a['rss_kib'] - first['rss_kib']) / 1024:+.1f} MiB"
                f" over 0 sockets, {(a['rss_kib'] - peak['rss_kib']) / 1024:+.1f} MiB over"
                f" {peak['sockets']:,} sockets), fds {a['fds']} ({a['fds'] - first['fds']:+d} over 0 sockets)"
            )
            if "closed" in a and a.get("gateway_ws_clients_at_drain") == 0:
                line += (
                    f"; the server handled the {a['closed']:,} disconnects in {a['drain_s']} s"
                    f" ({a['drain_cpu_s']} CPU-s)"
                )
            elif "closed" in a:
                line += (
                    f"; gateway_ws_clients was STILL {_num(a.get('gateway_ws_clients_at_drain'), ',.0f')}"
                    f" {a['drain_s']} s after the {a['closed']:,} sockets closed (their disconnect() never ran?)"
                )
            out.append(line)
    if r.killed_on_close[0]:
        warnings, instances = r.killed_on_close
        out.append(
            f"Daphne killed {instances:,} application instance(s) that had not ended within its"
            f" application_close_timeout after their socket closed ({warnings:,} warnings)"
        )
    if r.reopen_failures:
        out.append(f"failures while reopening: {r.reopen_failures}")
    if r.extensions:
        out.append(f"WebSocket extensions accepted by the server: {r.extensions}")
    for name, code in r.exit_codes.items():
        if code not in (0, None, -signal.SIGTERM):
            out.append(f"{name} exited with {code}")
    for name, lines in r.log_problems.items():
        out.append(f"{len(lines)} notable line(s) in the {name} log, first: {lines[0]}")
    return out


def print_tracemalloc(results: list[CaseResult]) -> None:
    for r in results:
        t = r.tracemalloc
        if not t:
            continue
        print(
            f"\ntracemalloc {r.case}: {t['traced_kib_per_socket']} KiB per socket traced by Python"
            f" (of {_num(r.kib_per_socket_fit)} KiB RSS) over {t['sockets']:,} sockets"
        )
        print(
            format_rows(
                [["package", "bytes/socket", "blocks/socket"]]
                + [
                    [p["package"], f"{p['bytes_per_socket']:,}", _num(p["blocks_per_socket"])]
                    for p in t["by_package"][:15]
                ]
            )
        )
        print()
        print(
            format_rows(
                [["allocated at", "bytes/socket", "blocks/socket"]]
                + [[p["where"], f"{p['bytes_per_socket']:,}", _num(p["blocks_per_socket"])] for p in t["by_line"][:25]]
            )
        )
        print()
        print(
            format_rows(
                [["first caller outside the stdlib", "bytes/socket"]]
                + [[p["where"], f"{p['bytes_per_socket']:,}"] for p in t["by_caller"][:20]]
            )
        )


def busy_note(cpu: dict[str, Any]) -> list[str]:
    if cpu["others_share"] <= 0.05:
        return []
    return [f"other processes used {100 * cpu['others_share']:.0f} % of the machine during the run: noisier figures"]


def to_rows(results: list[CaseResult], args: argparse.Namespace, cpu: dict[str, Any]) -> list[Row]:
    """The harness's rows (bench/rows.py): one per layer, in the "idle" section."""
    rows = []
    for r in results:
        extra: dict[str, Any] = {
            "KiB/socket": None if r.kib_per_socket_fit is None else round(r.kib_per_socket_fit, 1),
            "held": r.held,
            "RSS MiB at 0": round(r.steps[0]["rss_kib"] / 1024, 1) if r.steps else None,
            "RSS MiB at max": round(r.steps[-1]["rss_kib"] / 1024, 1) if r.steps else None,
            "fds": r.steps[-1]["fds"] if r.steps else None,
        }
        notes = notes_for(r, args)
        if r.kib_per_socket_last is not None:
            notes.append(f"last step delta / sockets: {r.kib_per_socket_last:.1f} KiB")
        if args.tracemalloc:
            notes.append("DIAGNOSTIC run (--tracemalloc): tracemalloc inflates memory and time")
        if args.gateway_env:
            notes.append(f"DIAGNOSTIC run: gateway environment {args.gateway_env}")
        notes.extend(busy_note(cpu))
        rows.append(Row(section="idle", case=r.case, extra=extra, notes=notes, error=r.error))
    return rows


# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--max", type=int, default=None, help="idle sockets at the last step (default 10000)")
    parser.add_argument("--quick", action="store_true", help="2,000 sockets instead of 10,000")
    parser.add_argument("--steps", default=None, help="comma-separated socket counts (default: 0, 10/25/50/100 %%)")
    parser.add_argument("--layers", default="memory,redis", help="comma-separated: memory, redis")
    parser.add_argument("--redis-db", type=int, default=14, help="Redis db of the redis case (FLUSHED; default 14)")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds to let the server settle after a step")
    parser.add_argument("--concurrency", type=int, default=32, help="sockets being opened at once (Daphne backlog 50)")
    parser.add_argument(
        "--no-reopen",
        dest="reopen",
        action="store_false",
        help="after closing every socket, do not open as many again (the check that closed sockets' memory is reused)",
    )
    parser.add_argument(
        "--grants",
        type=int,
        default=0,
        metavar="N",
        help="sockets of an ordinary user whose group may operate N devices, instead of the superuser's",
    )
    parser.add_argument("--rows", default=None, metavar="FILE", help="also write the harness's rows (bench/rows.py)")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="diagnostic: trace the web process's allocations, compare snapshots at 0 and at max (much slower)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="diagnostic: set this in the gateway's environment (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    args = parser.parse_args(argv)
    if args.max is None:
        args.max = 2000 if args.quick else 10000
    if args.max < 1:
        parser.error("--max must be at least 1")
    if args.grants < 0:
        parser.error("--grants must not be negative")
    if args.steps is not None:
        try:
            args.steps = sorted({int(item) for item in args.steps.split(",") if item.strip()})
        except ValueError:
            parser.error("--steps takes comma-separated integers")
        if len(args.steps) < 2 or args.steps[0] < 0:
            parser.error("--steps needs at least two non-negative counts")
        args.max = args.steps[-1]
    parse_gateway_env(parser, args)
    parse_layers(parser, args, CASE_NAMES)
    return args


async def main_async(args: argparse.Namespace, tmp: Path) -> list[CaseResult]:
    return await run_cases(
        tmp,
        [(layer, functools.partial(case_gateway, args, layer)) for layer in args.layers],
        f"up to {args.max:,} idle sockets in steps {steps_for(args)}",
        lambda layer, error: CaseResult(layer=layer, case=case_name(layer, args), error=error),
    )


def result_file(args: argparse.Namespace) -> Path:
    """``idle_ws.json`` for the reference figures; diagnostic runs get their own file beside it."""
    suffix = [name for name, on in (("tracemalloc", args.tracemalloc), ("env", args.gateway_env)) if on]
    if args.grants:
        suffix.insert(0, f"grants{args.grants}")
    return RESULTS_DIR / (f"idle_ws-{'-'.join(suffix)}.json" if suffix else "idle_ws.json")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    limits = raise_fd_limit()
    if limits["soft"] < args.max + FD_MARGIN:
        print(
            f"warning: RLIMIT_NOFILE is {limits['soft']:,} (hard limit): not enough for {args.max:,} sockets",
            file=sys.stderr,
        )
    results, tmp, started, cpu_before = run_in_tempdir(args, main_async, prefix="gw-bench-idle-")
    print()
    print(
        f"Idle WebSockets: memory per socket and sockets held by one web process, up to {args.max:,}"
        f" (RLIMIT_NOFILE {limits['soft']:,}, hard {limits['hard']:,}; {os.cpu_count()} CPUs)"
    )
    print("KiB/socket = least-squares slope of the web process's RSS over held sockets; (last/N) = last step's delta")
    if args.tracemalloc:
        print("DIAGNOSTIC run: --tracemalloc (allocations traced; memory and times are inflated)")
    print(table(results))
    cpu = cpu_report(cpu_before, cpu_seconds())
    print_cpu_note(cpu)
    for r in results:
        for line in notes_for(r, args):
            print(f"note: {r.layer}: {line}")
    for r in results:
        if r.steps:
            print(f"\nsteps: {r.case}")
            print(steps_table(r))
    print_tracemalloc(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "args": dict(vars(args)),
        "rlimit_nofile": limits,
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "versions": versions(),
        "target_kib_per_socket": TARGET_KIB,
        "tmp": str(tmp) if args.keep else None,
        "results": [r.__dict__ for r in results],
    }
    out = result_file(args)
    out.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nwritten: {out}  ({time.monotonic() - started:.0f} s in all)")
    if args.rows:
        write_rows(args.rows, to_rows(results, args, cpu))
        print(f"rows: {args.rows}")
    if args.keep:
        print(f"kept: {tmp}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
