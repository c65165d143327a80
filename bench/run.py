#!/usr/bin/env python
"""The benchmark harness: every benchmark, one command, one table.

    python bench/run.py            # everything (~20 minutes on 2 cores)
    python bench/run.py --quick    # the same cases, smaller (~6 minutes)
    python bench/run.py --only limits,websocket

Runs each benchmark script of this folder as a child process with ``--rows FILE`` (bench/rows.py), in this order:
the limits (a bare aiomqtt and paho subscriber), ingest (the bridge alone), MQTT -> WebSocket (1 and 50 clients of
every device, 200 clients of one device each; flat out, then paced at 25/50/90 % of that rate and at 1,000 msg/s),
the command round trip, and idle WebSockets. Then it divides every gateway message rate by the raw aiomqtt
subscriber's rate at the same QoS from this same run, prints one table and where each of the issue's targets stands,
and writes both to bench/results/run-latest.json and run-latest.md (plus a timestamped copy). Each script's own output
goes to bench/results/run-logs/; a script that fails leaves its rows marked and the others still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rows import SECTIONS, Row, read_rows

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Step:
    section: str
    name: str
    argv: list[str]
    quick: list[str]


def steps() -> list[Step]:
    ws = "mqtt_to_ws.py"
    fractions = ["--rates", "0.25,0.5,0.9"]
    return [
        Step("limits", "limits", ["limits.py"], ["--quick"]),
        Step("ingest", "ingest", ["ingest.py"], ["--quick"]),
        Step("websocket", "1 client, QoS 0", [ws, "--qos", "0", "--no-raw", *fractions], ["--quick"]),
        Step("websocket", "1 client, QoS 1", [ws, "--qos", "1", "--no-raw", *fractions], ["--quick"]),
        Step(
            "websocket",
            "50 clients, QoS 1",
            [ws, "--qos", "1", "--no-raw", "--clients", "50", *fractions, "--at", "1000"],
            ["--quick"],
        ),
        Step(
            "websocket",
            "200 one-device clients, QoS 1",
            [ws, "--qos", "1", "--no-raw", "--watchers", "200", *fractions],
            ["--quick"],
        ),
        Step("commands", "commands", ["command_rtt.py"], ["--quick"]),
        Step("idle", "idle", ["idle_ws.py"], ["--quick"]),
    ]


@dataclass
class StepResult:
    step: str
    seconds: float
    exit_code: int | None
    log: str
    rows: int


def run_step(step: Step, *, quick: bool, logs: Path, workdir: Path, index: int) -> tuple[list[Row], StepResult]:
    rows_file = workdir / f"rows-{index}.json"
    argv = [
        sys.executable,
        str(HERE / step.argv[0]),
        *step.argv[1:],
        *(step.quick if quick else []),
        "--rows",
        str(rows_file),
    ]
    log = logs / f"{index:02d}-{step.name.replace(' ', '-').replace(',', '')}.log"
    started = time.monotonic()
    print(f"- {step.name}: {' '.join(argv[1:])}", flush=True)
    with log.open("w") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent)
    seconds = time.monotonic() - started
    found: list[Row] = read_rows(rows_file) if rows_file.exists() else []
    if not found:
        found = [Row(section=step.section, case=step.name, error=f"no rows (exit {code}); see {log}")]
    print(f"  exit {code} after {seconds:.0f} s, {len(found)} row(s); log: {log}", flush=True)
    return found, StepResult(step.name, round(seconds, 1), code, str(log), len(found))


def add_ratios(rows: list[Row]) -> dict[int, float]:
    """Each rate with ``ratio_base == "aiomqtt"`` divided by the raw aiomqtt subscriber's rate at the same QoS."""
    reference = {
        row.qos: row.rate
        for row in rows
        if row.section == "limits" and row.case.startswith("aiomqtt") and row.rate and not row.error
    }
    ratios: dict[int, float] = {}
    for index, row in enumerate(rows):
        base = reference.get(row.qos)
        if row.ratio_base == "aiomqtt" and row.rate and base:
            ratios[index] = row.rate / base
    return ratios


def _figure(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.{digits}f}"


def _extra(row: Row) -> str:
    parts = [
        f"{key} {value:,.1f}" if isinstance(value, float) else f"{key} {value}" for key, value in row.extra.items()
    ]
    return "; ".join(parts)


def table(rows: list[Row], ratios: dict[int, float]) -> list[list[str]]:
    header = ["section", "case", "QoS", "msg/s", "x aiomqtt", "p50 ms", "p99 ms", "other"]
    lines = [header]
    for section in SECTIONS:
        for index, row in enumerate(rows):
            if row.section != section:
                continue
            ratio = f"{ratios[index]:.2f}" if index in ratios else ""
            other = f"FAILED: {row.error}" if row.error else _extra(row)
            qos = "" if row.qos is None else str(row.qos)
            lines.append(
                [section, row.case, qos, _figure(row.rate), ratio, _figure(row.p50_ms), _figure(row.p99_ms), other]
            )
    return lines


def render_text(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=False))
        ]
        out.append("  ".join([*cells, line[-1]]).rstrip())
        if n == 0:
            out.append("  ".join("-" * width for width in widths) + "  -----")
    return "\n".join(out)


def render_markdown(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "|".join("---" for _ in lines[0]) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines[1:]]
    return "\n".join(out)


def _find(rows: list[Row], section: str, *words: str) -> list[tuple[int, Row]]:
    return [
        (i, r) for i, r in enumerate(rows) if r.section == section and all(w in r.case for w in words) and not r.error
    ]


def targets(rows: list[Row], ratios: dict[int, float]) -> list[str]:
    """Where each of the issue's targets stands in this run."""
    verdicts: list[str] = []

    def ratio_target(label: str, goal: float, found: list[tuple[int, Row]]) -> None:
        for index, row in found:
            if index in ratios:
                mark = "met" if ratios[index] >= goal else "NOT met"
                verdicts.append(f"{label} ({row.case}, QoS {row.qos}): {ratios[index]:.2f}x >= {goal}x: {mark}")
        if not any(index in ratios for index, _ in found):
            verdicts.append(f"{label}: not measured")

    ratio_target("1 client, in-memory layer", 0.6, _find(rows, "websocket", "memory", "1 client", "flat out"))
    ratio_target("1 client, Redis layer", 0.4, _find(rows, "websocket", "redis", "1 client", "flat out"))
    ratio_target("50 all-device clients", 0.3, _find(rows, "websocket", "50 clients", "flat out"))
    paced = _find(rows, "websocket", "50 clients", "1,000 msg/s")
    for _, row in paced:
        mark = "met" if row.p99_ms is not None and row.p99_ms < 50 else "NOT met"
        verdicts.append(f"p99 at 1,000 msg/s, 50 clients ({row.case}): {_figure(row.p99_ms)} ms < 50 ms: {mark}")
    if not paced:
        verdicts.append("p99 at 1,000 msg/s with 50 clients: not measured")
    sequential = _find(rows, "commands", "sequential")
    for _, row in sequential:
        mark = "met" if row.p99_ms is not None and row.p99_ms < 30 else "NOT met"
        verdicts.append(f"command round trip p99 ({row.case}): {_figure(row.p99_ms)} ms < 30 ms: {mark}")
    if not sequential:
        verdicts.append("command round trip: not measured")
    idle = _find(rows, "idle")
    for _, row in idle:
        per_socket = row.extra.get("KiB/socket")
        mark = "met" if isinstance(per_socket, int | float) and per_socket <= 64 else "NOT met"
        verdicts.append(f"idle WebSocket memory ({row.case}): {_figure(per_socket)} KiB <= 64 KiB: {mark}")
    if not idle:
        verdicts.append("idle WebSocket memory: not measured")
    return verdicts


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="each script's --quick: smaller runs, same cases")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = args.only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if args.only and "limits" not in args.only:
        print("note: without the limits section no ratio can be given", file=sys.stderr)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "run-logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    rows: list[Row] = []
    ran: list[StepResult] = []
    with tempfile.TemporaryDirectory(prefix="gw-bench-run-") as tmp:
        for index, step in enumerate(steps()):
            if args.only and step.section not in args.only:
                continue
            found, result = run_step(step, quick=args.quick, logs=logs, workdir=Path(tmp), index=index)
            rows.extend(found)
            ran.append(result)
    ratios = add_ratios(rows)
    lines = table(rows, ratios)
    verdicts = targets(rows, ratios)
    seconds = time.monotonic() - started
    title = f"Gateway benchmarks{' (--quick)' if args.quick else ''}: {os.cpu_count()} CPUs, {seconds / 60:.1f} min"
    print(f"\n{title}\n{render_text(lines)}\n")
    for verdict in verdicts:
        print(f"target: {verdict}")
    notes = [f"{row.case}: {note}" for row in rows for note in row.notes]
    for note in notes:
        print(f"note: {note}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    document = {
        "when": stamp,
        "quick": args.quick,
        "seconds": round(seconds, 1),
        "steps": [asdict(result) for result in ran],
        "rows": [asdict(row) | {"ratio": ratios.get(i)} for i, row in enumerate(rows)],
        "targets": verdicts,
    }
    text = json.dumps(document, indent=2, default=str)
    (RESULTS / "run-latest.json").write_text(text)
    (RESULTS / f"run-{stamp}.json").write_text(text)
    markdown = f"# {title}\n\n{render_markdown(lines)}\n\n" + "\n".join(f"- {verdict}" for verdict in verdicts) + "\n"
    (RESULTS / "run-latest.md").write_text(markdown)
    print(f"\nwritten: {RESULTS / 'run-latest.json'} and run-latest.md")
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
