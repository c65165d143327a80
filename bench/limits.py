#!/usr/bin/env python
"""The limits: what a bare MQTT subscriber receives from the gateway benchmarks' publisher, per client and QoS.

The publisher, payloads and QoS are mqtt_to_ws.py's (one paho publisher process, ~121-byte JSON telemetry from
1,000 devices under ``bench``, warm-up of one message per device first); the receiver is a subscriber in this
process, with no gateway, on a fresh Mosquitto per case:

* ``aiomqtt subscriber``: an ``aiomqtt.Client`` (MQTT 5) subscribed to ``bench/+/telemetry``, like mqtt_to_ws.py's
  ``aiomqtt raw`` case. The benchmark harness divides every gateway rate by this row's rate at the same QoS.
* ``paho subscriber``: a plain paho-mqtt 2.x client (MQTT 5) with its network loop in its own thread, counting in
  ``on_message``: the same socket work without asyncio.

    python bench/limits.py [--messages N] [--qos 0,1] [--quick] [--rows FILE] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from mqtt_to_ws import (
    DEVICES,
    PREFIX,
    WARMUP,
    Processes,
    Receiver,
    cpu_report,
    cpu_seconds,
    log_problems,
    measure,
    print_cpu_note,
    run_in_tempdir,
    start_mosquitto,
    versions,
)
from mqtt_to_ws import aiomqtt_subscriber as aiomqtt_telemetry_subscriber
from rows import Row, write_rows

TOPIC_FILTER = f"{PREFIX}/+/telemetry"
# Note a case during which other processes used more than this share of the machine (cases shorter than
# OTHERS_NOTE_AFTER s are not judged: /proc/stat and os.times() in 10 ms ticks make short spans too noisy).
OTHERS_NOTE_SHARE = 0.05
OTHERS_NOTE_AFTER = 2.0

Subscriber = Callable[[int, int, Receiver], AbstractAsyncContextManager[None]]


# ----------------------------------------------------------------------------------------------------
# The subscribers (in this process): each feeds the Receiver (n, payload ts, receive time) per message
# ----------------------------------------------------------------------------------------------------


def aiomqtt_subscriber(port: int, qos: int, receiver: Receiver) -> AbstractAsyncContextManager[None]:
    """An ``aiomqtt.Client`` (MQTT 5) subscribed to the telemetry, counting as mqtt_to_ws.case_raw does (it is
    mqtt_to_ws.aiomqtt_subscriber, the raw reference's subscriber)."""
    return aiomqtt_telemetry_subscriber(port, qos, receiver, client_prefix="bench-limits-aiomqtt")


@contextlib.asynccontextmanager
async def paho_subscriber(port: int, qos: int, receiver: Receiver) -> AsyncIterator[None]:
    """A paho-mqtt 2.x client (MQTT 5), its network loop in a thread (``loop_start``), counting in ``on_message``.

    ``on_message`` only notes (n, ts, receive time) in a deque; a task on this event loop hands those to the
    ``Receiver`` every 20 ms (its ``Tally`` is not thread-safe). The figures use the times taken in paho's thread.
    """
    import orjson
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    inbox: deque[tuple[int, float, float]] = deque()
    connected, subscribed = threading.Event(), threading.Event()
    problems: Counter[str] = Counter()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            problems[f"connect: {reason}"] += 1
        connected.set()

    def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            problems[f"subscribe: {reasons}"] += 1
        subscribed.set()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        now = time.time()
        data = orjson.loads(message.payload)
        inbox.append((data["n"], data["ts"], now))

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-limits-paho-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()

    async def hand_over() -> None:
        while True:
            while inbox:
                receiver.event(*inbox.popleft())
            await asyncio.sleep(0.02)

    mover = asyncio.create_task(hand_over())
    try:
        if not await asyncio.to_thread(connected.wait, 10) or problems:
            raise RuntimeError(f"paho subscriber could not connect: {dict(problems) or 'no CONNACK within 10 s'}")
        client.subscribe(TOPIC_FILTER, qos=qos)
        if not await asyncio.to_thread(subscribed.wait, 10) or problems:
            raise RuntimeError(f"paho subscriber could not subscribe: {dict(problems) or 'no SUBACK within 10 s'}")
        yield
    finally:
        client.disconnect()
        client.loop_stop()
        mover.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await mover
        while inbox:
            receiver.event(*inbox.popleft())


SUBSCRIBERS: dict[str, Subscriber] = {"aiomqtt subscriber": aiomqtt_subscriber, "paho subscriber": paho_subscriber}


# ----------------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------------


def others_note(before: tuple[float, float, float], after: tuple[float, float, float]) -> str | None:
    """A note when other processes used a noticeable share of the machine during a case."""
    cpu = cpu_report(before, after)
    if cpu["wall_s"] < OTHERS_NOTE_AFTER or cpu["others_share"] <= OTHERS_NOTE_SHARE:
        return None
    return f"other processes used {100 * cpu['others_share']:.0f} % of the machine during this case: noisier figures"


def print_run_cpu_note(cpu: dict[str, Any]) -> None:
    """mqtt_to_ws.print_cpu_note, for runs long enough to judge."""
    if cpu["wall_s"] >= OTHERS_NOTE_AFTER:
        print_cpu_note(cpu)


def delivery_notes(receiver: Receiver, published: dict[str, Any]) -> list[str]:
    """What went wrong between publisher and receiver (shared with ingest.py)."""
    tally = receiver.measured
    notes: list[str] = []
    lost = tally.expected - tally.received
    if lost:
        notes.append(f"{lost} of {tally.expected:,} never arrived; first missing n: {tally.missing(10)}")
    if tally.duplicates:
        notes.append(f"{tally.duplicates} duplicate(s)")
    if receiver.warmup.received < WARMUP:
        notes.append(f"warm-up delivered {receiver.warmup.received}/{WARMUP}")
    if receiver.unexpected:
        notes.append(f"unexpected: {dict(receiver.unexpected)}")
    if tally.longest_gap > 2.0:
        notes.append(f"longest pause between two receives: {tally.longest_gap:.1f} s")
    for phase in (published, published.get("warmup") or {}):
        if phase.get("errors"):
            notes.append(f"publish errors (paho rc: count): {phase['errors']}")
    return notes


def process_notes(procs: Processes, *, skip: str = "") -> list[str]:
    """Unexpected exit codes and notable log lines of the processes a case started."""
    notes: list[str] = []
    for proc in procs.items:
        if proc.returncode not in (0, None, -signal.SIGTERM):
            notes.append(f"{proc.name} exited {proc.returncode}{' (killed after SIGTERM)' if proc.killed else ''}")
        lines = [line for line in log_problems(proc) if not (skip and skip in line)]
        if lines:
            notes.append(f"{len(lines)} notable line(s) in the {proc.name} log, first: {lines[0]}")
    return notes


async def run_case(name: str, qos: int, messages: int, workdir: Path) -> Row:
    row = Row(section="limits", case=name, qos=qos)
    cpu_before = cpu_seconds()
    procs = Processes()
    try:
        # The broker and publisher as the gateway benchmarks run them (mqtt_to_ws.py's default --nodelay on).
        port = start_mosquitto(procs, workdir, extra_config="set_tcp_nodelay true\n")
        receiver = Receiver(messages)
        async with SUBSCRIBERS[name](port, qos, receiver):
            published = await measure(receiver, port, qos, messages, 0.0, nodelay=True)
        tally = receiver.measured
        row.rate = round(tally.rate(), 1)
        row.p50_ms = _round(tally.percentile_ms(0.50))
        row.p99_ms = _round(tally.percentile_ms(0.99))
        row.extra = {
            "published msg/s": round(float(published.get("rate", 0.0))),
            "lost": tally.expected - tally.received,
        }
        row.notes += delivery_notes(receiver, published)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        procs.stop_all()
        row.notes += process_notes(procs)
    if note := others_note(cpu_before, cpu_seconds()):
        row.notes.append(note)
    return row


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# ----------------------------------------------------------------------------------------------------
# Output (format_table and qos_list are shared with ingest.py)
# ----------------------------------------------------------------------------------------------------


def format_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Columns padded to width: the first left-aligned, the others right-aligned."""
    rows = [list(header), *[list(cells) for cells in body]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def number(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    header = ["case", "qos", "delivered msg/s", "p50 ms", "p99 ms", "published msg/s", "lost"]
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
                number(row.extra.get("published msg/s")),
                str(row.extra.get("lost", "-")),
            ]
        )
    return format_table(header, body)


def print_notes(rows: list[Row]) -> None:
    for row in rows:
        label = f"{row.case} (qos{row.qos})"
        if row.error:
            print(f"note: {label}: FAILED: {row.error}")
        for note in row.notes:
            print(f"note: {label}: {note}")


def qos_list(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        parser.error(f"--qos {text!r}: expected a comma-separated list of 0 and 1")
    if not values or set(values) - {0, 1}:
        parser.error(f"--qos {text!r}: expected a comma-separated list of 0 and 1")
    return values


def finish(
    args: argparse.Namespace,
    rows: list[Row],
    table_text: str,
    tmp: Path,
    started: float,
    cpu_before: tuple[float, float, float],
) -> int:
    """The end of main() here and in ingest.py, after the heading: the table, the CPU and per-row notes, the rows
    file (``--rows``), the time taken and the kept directory (``--keep``); returns the exit status."""
    print(table_text)
    print_run_cpu_note(cpu_report(cpu_before, cpu_seconds()))
    print_notes(rows)
    if args.rows:
        write_rows(args.rows, rows)
        print(f"\nrows written to {args.rows}")
    print(f"({time.monotonic() - started:.0f} s in all)")
    if args.keep:
        print(f"kept: {tmp}")
    return 1 if any(row.error for row in rows) else 0


# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=None, help="measured messages per case (default 20000)")
    parser.add_argument("--qos", default="0,1", help="comma-separated QoS levels (default 0,1)")
    parser.add_argument("--quick", action="store_true", help="5,000 messages instead of 20,000")
    parser.add_argument("--rows", metavar="FILE", help="write the rows (bench/rows.py) to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (Mosquitto logs)")
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = 5000 if args.quick else 20000
    if args.messages < 2:
        parser.error("--messages must be at least 2")
    args.qos = qos_list(parser, args.qos)
    return args


async def main_async(args: argparse.Namespace, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    for qos in args.qos:
        for name in SUBSCRIBERS:
            workdir = tmp / f"{name.split()[0]}-qos{qos}"
            workdir.mkdir()
            print(f"- {name}, QoS {qos}: {args.messages:,} messages ...", flush=True)
            started = time.monotonic()
            rows.append(await run_case(name, qos, args.messages, workdir))
            print(f"  done in {time.monotonic() - started:.1f} s", flush=True)
    return rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rows, tmp, started, cpu_before = run_in_tempdir(args, main_async, prefix="gw-limits-")
    found = versions()
    print()
    print(
        f"The limits: a bare subscriber, {args.messages:,} messages of ~120 B from {DEVICES:,} devices per case"
        f" ({os.cpu_count()} CPUs; aiomqtt {found.get('aiomqtt', '?')}, paho-mqtt {found.get('paho-mqtt', '?')},"
        f" {found.get('mosquitto', 'mosquitto ?')})"
    )
    return finish(args, rows, table(rows), tmp, started, cpu_before)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
