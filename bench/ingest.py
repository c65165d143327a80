#!/usr/bin/env python
"""Ingest: MQTT -> stored -> channel-layer event, through the real bridge alone (no WebSocket, no Daphne).

For each channel layer (``memory``, ``redis``) x database (``sqlite``, ``postgres``) x QoS (0, 1): a fresh
Mosquitto, a fresh database and (Redis) a flushed Redis db, then a worker process (``ingest.py _worker``) that
migrates, builds the bridge exactly as ``runbridge`` does (``mqtt_bridge.factory.bridge_from_settings``, with
``Bridge.flush`` timed by a subclass) and runs it beside a listener: a channel of the same layer in
``gateway.events.EVENTS_GROUP``, counting the events of the ``gateway.events`` messages. The worker warms up and
publishes as mqtt_to_ws.py does (one paho publisher process, ~121-byte JSON from 1,000 devices under ``bench``)
and prints one JSON line; this process then stops it. See bench/README.md.

    python bench/ingest.py [--messages N] [--qos 0,1] [--layers memory,redis] [--databases sqlite,postgres]
                           [--quick] [--redis-db 14] [--postgres URL] [--rows FILE] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

from limits import finish, format_table, number, others_note, process_notes, qos_list
from mqtt_to_ws import (
    DEVICES,
    LAYERS,
    ROOT,
    WARMUP,
    Proc,
    Processes,
    Receiver,
    cpu_seconds,
    delivery_cap,
    flush_redis_db,
    gateway_env,
    measure,
    redis_url,
    run_in_tempdir,
    start_mosquitto,
    versions,
)
from rows import Row

SCRIPT = str(Path(__file__).resolve())
RESULT_MARK = "INGEST-RESULT "  # the worker's result line in its log
POSTGRES_SERVER = "postgres://postgres@127.0.0.1:5432/postgres"
POSTGRES_DB = "bench_ingest"
DATABASES = ("sqlite", "postgres")
CONNECT_TIMEOUT = 30.0  # s for the worker's bridge to connect and subscribe
SETUP_ALLOWANCE = 180.0  # s for the worker to start, migrate and connect (PostgreSQL migrations are the slow part)
COUNTERS = re.compile(r"dropped|lost|failures|errors|retries|rejected|skipped|reconnects")


# ----------------------------------------------------------------------------------------------------
# The worker (a separate process: `python bench/ingest.py _worker --qos Q --messages N`)
# ----------------------------------------------------------------------------------------------------


@dataclass
class Listened:
    """What the layer listener saw, beside the ``Receiver``'s counts."""

    layer_messages: int = 0
    seq_gaps: int = 0  # gateway.events messages missing from a source's sequence (lost in the layer)
    invalid: int = 0
    flushes: list[tuple[float, int]] = field(default_factory=list)  # measured Bridge.flush calls: (seconds, messages)
    recording: bool = False


def run_worker(argv: list[str]) -> int:
    """Migrate, then run the bridge and the listener; print the result line; run until SIGTERM."""
    parser = argparse.ArgumentParser(prog="ingest.py _worker")
    parser.add_argument("--qos", type=int, choices=(0, 1), required=True)
    parser.add_argument("--messages", type=int, required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    return asyncio.run(work(args.qos, args.messages))


async def work(qos: int, messages: int) -> int:
    import orjson
    from channels.layers import get_channel_layer
    from django.conf import settings

    from gateway.events import EVENTS_GROUP, parse_events_message
    from mqtt_bridge import factory
    from mqtt_bridge.bridge import Bridge
    from mqtt_bridge.client import InboundMessage, MqttClient
    from mqtt_bridge.systemd import Notifier, ServiceStatus, SystemdSettings

    seen = Listened()

    class TimedBridge(Bridge):
        """The bridge, with each flush (decode + store + acknowledge + announce) timed in the measured phase."""

        async def flush(self, client: MqttClient, batch: Sequence[InboundMessage]) -> None:
            started = time.perf_counter()
            await super().flush(client, batch)
            if seen.recording:
                seen.flushes.append((time.perf_counter() - started, len(batch)))

    # As runbridge builds it (its systemd notifier is a no-op without NOTIFY_SOCKET), with the subclass.
    notifier = Notifier(SystemdSettings.from_settings(settings.SYSTEMD).notify_socket)
    with mock.patch.object(factory, "Bridge", TimedBridge):
        bridge = factory.bridge_from_settings(on_state=ServiceStatus(notifier, where=settings.MQTT["DISPLAY_URL"]))
    if not isinstance(bridge, TimedBridge):
        raise RuntimeError("mqtt_bridge.factory no longer builds its Bridge by that name: flushes cannot be timed")

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(EVENTS_GROUP, channel)
    receiver = Receiver(messages)
    sequences: dict[str, int] = {}

    async def listen() -> None:
        while True:
            message = await layer.receive(channel)
            now = time.time()
            try:
                batch = parse_events_message(message)
            except ValueError:
                seen.invalid += 1
                continue
            seen.layer_messages += 1
            previous = sequences.get(batch["source"])
            if previous is not None and batch["seq"] > previous + 1:
                seen.seq_gaps += batch["seq"] - previous - 1
            sequences[batch["source"]] = max(batch["seq"], previous or 0)
            tally = None
            for event in batch["events"]:
                frame = orjson.loads(event["frame"])
                values = frame.get("values")
                if frame.get("type") != "telemetry" or not isinstance(values, dict) or "device_ts" not in frame:
                    receiver.unexpected[f"event:{frame.get('type')}"] += 1
                    continue
                tally = receiver.event(values["n"], frame["device_ts"], now) or tally
            if tally is not None:
                tally.frames += 1

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bridge.stop)
    listener = asyncio.create_task(listen(), name="listener")
    running = asyncio.create_task(bridge.run(), name="bridge")
    connected = asyncio.create_task(bridge.wait_connected())
    await asyncio.wait({connected, running}, timeout=CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    connected.cancel()
    result: dict[str, Any]
    if not bridge.connected:
        why = bridge.last_error or ("its run() ended" if running.done() else "no connection yet")
        result = {"error": f"the bridge was not connected within {CONNECT_TIMEOUT:.0f} s: {why}"}
    else:

        def start_recording() -> None:
            seen.recording = True

        try:
            published = await measure(
                receiver, settings.MQTT["PORT"], qos, messages, 0.0, on_start=start_recording, nodelay=True
            )
            seen.recording = False
            result = summary(receiver, seen, published)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
    if listener.done():
        result["listener"] = f"ended: {listener.exception() if not listener.cancelled() else 'cancelled'}"
    if running.done():
        result["bridge"] = f"ended: {running.exception() if not running.cancelled() else 'cancelled'}"
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)
    await running  # until SIGTERM: the bridge stores and acknowledges what it holds, then returns
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    with contextlib.suppress(Exception):
        await layer.group_discard(EVENTS_GROUP, channel)
    return 0


def summary(receiver: Receiver, seen: Listened, published: dict[str, Any]) -> dict[str, Any]:
    tally = receiver.measured
    durations = sorted(seconds for seconds, _ in seen.flushes)
    flushed = sum(count for _, count in seen.flushes)
    return {
        "rate": tally.rate(),
        "expected": tally.expected,
        "received": tally.received,
        "lost": tally.expected - tally.received,
        "duplicates": tally.duplicates,
        "missing": tally.missing(10),
        "warmup_received": receiver.warmup.received,
        "unexpected": dict(receiver.unexpected),
        "longest_gap_s": tally.longest_gap,
        "e2e_p50_ms": tally.percentile_ms(0.50),
        "e2e_p99_ms": tally.percentile_ms(0.99),
        "flushes": len(durations),
        "flush_p50_ms": percentile_ms(durations, 0.50),
        "flush_p99_ms": percentile_ms(durations, 0.99),
        "flush_max_ms": percentile_ms(durations, 1.0),
        "events_per_batch": flushed / len(durations) if durations else None,
        "events_per_layer_message": tally.received / tally.frames if tally.frames else None,
        "layer_messages": seen.layer_messages,
        "layer_seq_gaps": seen.seq_gaps,
        "layer_invalid": seen.invalid,
        "published": published,
        "counters": problem_counters(),
    }


def percentile_ms(ordered: list[float], q: float) -> float | None:
    """As ``Tally.percentile_ms``: the value at rank ``int(q * n)`` of the sorted seconds, in ms."""
    if not ordered:
        return None
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def problem_counters() -> dict[str, float]:
    """The bridge's non-zero drop/loss/failure/retry counters (its Prometheus registry, in this process)."""
    from prometheus_client import REGISTRY

    found: dict[str, float] = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name.startswith("gateway_") and COUNTERS.search(sample.name) and sample.value:
                if sample.name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


# ----------------------------------------------------------------------------------------------------
# The cases (this process)
# ----------------------------------------------------------------------------------------------------


def database_url(server: str, name: str) -> str:
    return urlsplit(server)._replace(path=f"/{name}").geturl()


def recreate_database(server: str, name: str, *, create: bool = True) -> None:
    """Drop ``name`` on the PostgreSQL ``server`` if it exists (closing its connections); create it anew."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if create:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def worker_env(args: argparse.Namespace, workdir: Path, mqtt_port: int, layer: str, database: str) -> dict[str, str]:
    """The gateway processes' environment (mqtt_to_ws.gateway_env: nothing inherited, no .env, MQTT 5, prefix
    ``bench``, a unique client id), with this case's database and Redis db."""
    env = gateway_env(workdir=workdir, mqtt_port=mqtt_port, layer=layer)
    for name in ("REDIS_URL", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    if layer == "redis":
        env["REDIS_URL"] = redis_url(args.redis_db)
    if database == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{workdir / 'ingest.sqlite3'}"
    else:
        env["DATABASE_URL"] = database_url(args.postgres, POSTGRES_DB)
    return env


async def wait_result(worker: Proc, cap: float) -> dict[str, Any]:
    """The worker's result line, read from its log as it appears."""
    deadline = time.monotonic() + cap
    offset, partial = 0, b""
    while time.monotonic() < deadline:
        alive = worker.alive()  # before reading: a result written just before exiting is still found
        with worker.log.open("rb") as log:
            log.seek(offset)
            chunk = log.read()
        offset += len(chunk)
        *lines, partial = (partial + chunk).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text.startswith(RESULT_MARK):
                result: dict[str, Any] = json.loads(text[len(RESULT_MARK) :])
                return result
        if not alive:
            raise RuntimeError(f"the worker exited {worker.popen.returncode} before its result:\n{worker.tail(15)}")
        await asyncio.sleep(0.2)
    raise RuntimeError(f"no result from the worker within {cap:.0f} s:\n{worker.tail(15)}")


async def run_case(args: argparse.Namespace, layer: str, database: str, qos: int, workdir: Path) -> Row:
    row = Row(section="ingest", case=f"{layer} layer, {database}", qos=qos, ratio_base="aiomqtt")
    cpu_before = cpu_seconds()
    procs = Processes()
    postgres = False
    try:
        mqtt_port = start_mosquitto(procs, workdir, extra_config="set_tcp_nodelay true\n")  # as mqtt_to_ws.py
        env = worker_env(args, workdir, mqtt_port, layer, database)
        if layer == "redis":
            await asyncio.to_thread(flush_redis_db, args.redis_db)
        if database == "postgres":
            await asyncio.to_thread(recreate_database, args.postgres, POSTGRES_DB)
            postgres = True
        argv = [sys.executable, SCRIPT, "_worker", "--qos", str(qos), "--messages", str(args.messages)]
        worker = procs.start("worker", argv, env=env, log=workdir / "worker.log")
        result = await wait_result(worker, SETUP_ALLOWANCE + 60.0 + delivery_cap(args.messages))
        fill(row, result)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        await asyncio.to_thread(procs.stop_all)
        row.notes += process_notes(procs, skip=RESULT_MARK)
        if postgres:
            try:
                await asyncio.to_thread(recreate_database, args.postgres, POSTGRES_DB, create=False)
            except Exception as exc:
                row.notes.append(f"could not drop the database {POSTGRES_DB}: {exc}")
    if note := others_note(cpu_before, cpu_seconds()):
        servers = [name for name, used in (("Redis", layer == "redis"), ("PostgreSQL", postgres)) if used]
        verb = "count" if len(servers) > 1 else "counts"
        row.notes.append(note + (f" ({' and '.join(servers)} {verb} as other processes)" if servers else ""))
    return row


def fill(row: Row, result: dict[str, Any]) -> None:
    """The row's figures and notes from the worker's result."""
    for part in ("bridge", "listener"):
        if part in result:
            row.notes.append(f"the worker's {part} {result[part]} during the case")
    if "error" in result:
        row.error = str(result["error"])
        return
    row.rate = round(result["rate"], 1)
    row.p50_ms = _round(result["flush_p50_ms"])
    row.p99_ms = _round(result["flush_p99_ms"])
    per_batch = result["events_per_batch"]
    row.extra = {
        "lost": result["lost"],
        "events/batch": None if per_batch is None else round(per_batch, 1),
        "end-to-end p99 ms": _round(result["e2e_p99_ms"], 1),
    }
    if result["lost"]:
        row.notes.append(
            f"{result['lost']} of {result['expected']:,} never reached the layer listener;"
            f" first missing n: {result['missing']}"
        )
    if result["duplicates"]:
        row.notes.append(f"{result['duplicates']} duplicate event(s)")
    if result["warmup_received"] < WARMUP:
        row.notes.append(f"warm-up delivered {result['warmup_received']}/{WARMUP}")
    if result["unexpected"]:
        row.notes.append(f"unexpected: {result['unexpected']}")
    if result["longest_gap_s"] > 2.0:
        row.notes.append(f"longest pause between two events: {result['longest_gap_s']:.1f} s")
    if result["layer_seq_gaps"] or result["layer_invalid"]:
        row.notes.append(
            f"channel layer: {result['layer_seq_gaps']} gateway.events message(s) missing from the sequence,"
            f" {result['layer_invalid']} malformed"
        )
    published = result["published"]
    for phase in (published, published.get("warmup") or {}):
        if phase.get("errors"):
            row.notes.append(f"publish errors (paho rc: count): {phase['errors']}")
    if result["counters"]:
        row.notes.append(f"bridge counters: {result['counters']}")


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    header = ["case", "qos", "events/s", "batch p50 ms", "batch p99 ms", "events/batch", "end-to-end p99 ms", "lost"]
    body = []
    for row in rows:
        if row.error:
            body.append([row.case, str(row.qos), *["-"] * (len(header) - 2)])
            continue
        body.append(
            [
                row.case,
                str(row.qos),
                number(row.rate),
                number(row.p50_ms, ",.1f"),
                number(row.p99_ms, ",.1f"),
                number(row.extra.get("events/batch"), ",.1f"),
                number(row.extra.get("end-to-end p99 ms"), ",.0f"),
                str(row.extra.get("lost", "-")),
            ]
        )
    return format_table(header, body)


def names(parser: argparse.ArgumentParser, option: str, text: str, known: tuple[str, ...]) -> list[str]:
    values = [item.strip() for item in text.split(",") if item.strip()]
    unknown = set(values) - set(known)
    if not values or unknown:
        parser.error(f"{option} {text!r}: expected a comma-separated list of {', '.join(known)}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=None, help="measured messages per case (default 20000)")
    parser.add_argument("--qos", default="0,1", help="comma-separated QoS levels (default 0,1)")
    parser.add_argument("--layers", default="memory,redis", help="comma-separated: memory, redis")
    parser.add_argument("--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--quick", action="store_true", help="5,000 messages instead of 20,000")
    parser.add_argument(
        "--redis-db", type=int, default=14, help="Redis db for the redis layer (default 14; FLUSHED per case)"
    )
    parser.add_argument(
        "--postgres",
        default=POSTGRES_SERVER,
        metavar="URL",
        help=f"PostgreSQL server to create (and drop) the database {POSTGRES_DB} on (default {POSTGRES_SERVER})",
    )
    parser.add_argument("--rows", metavar="FILE", help="write the rows (bench/rows.py) to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, SQLite databases)")
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = 5000 if args.quick else 20000
    if args.messages < 2:
        parser.error("--messages must be at least 2")
    args.qos = qos_list(parser, args.qos)
    args.layers = names(parser, "--layers", args.layers, LAYERS)
    args.databases = names(parser, "--databases", args.databases, DATABASES)
    return args


async def main_async(args: argparse.Namespace, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    for layer in args.layers:
        for database in args.databases:
            for qos in args.qos:
                workdir = tmp / f"{layer}-{database}-qos{qos}"
                workdir.mkdir()
                print(f"- {layer} layer, {database}, QoS {qos}: {args.messages:,} messages ...", flush=True)
                started = time.monotonic()
                rows.append(await run_case(args, layer, database, qos, workdir))
                print(f"  done in {time.monotonic() - started:.1f} s", flush=True)
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        return run_worker(argv[1:])
    args = parse_args(argv)
    rows, tmp, started, cpu_before = run_in_tempdir(args, main_async, prefix="gw-ingest-")
    found = versions()
    print()
    print(
        f"Ingest: MQTT -> bridge -> database -> channel layer (no WebSocket), {args.messages:,} messages of ~120 B"
        f" from {DEVICES:,} devices per case ({os.cpu_count()} CPUs; Django {found.get('django', '?')},"
        f" channels-redis {found.get('channels-redis', '?')}, git {found.get('git', '?')})"
    )
    return finish(args, rows, table(rows), tmp, started, cpu_before)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
