"""bench/run.py's arithmetic: ratios to the same run's raw aiomqtt subscriber, and the targets' verdicts."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # a folder of scripts, not a package
run: Any = importlib.import_module("run")
Row: Any = importlib.import_module("rows").Row


def rows() -> list[Any]:
    return [
        Row("limits", "aiomqtt subscriber", qos=0, rate=10_000.0),
        Row("limits", "aiomqtt subscriber", qos=1, rate=8_000.0),
        Row("limits", "paho subscriber", qos=0, rate=20_000.0),
        Row("websocket", "memory, 1 client, flat out", qos=0, rate=7_000.0, ratio_base="aiomqtt"),
        Row("websocket", "redis, 1 client, flat out", qos=1, rate=2_000.0, ratio_base="aiomqtt"),
        Row("websocket", "memory, 1 client, 25% (1,750 msg/s)", qos=0, rate=1_750.0, p99_ms=12.0),
        Row("websocket", "memory, 50 clients, at 1,000 msg/s", qos=1, rate=1_000.0, p99_ms=61.0),
        Row("commands", "memory sequential", p50_ms=11.0, p99_ms=15.0),
        Row("idle", "memory layer (rungateway)", extra={"KiB/socket": 37.7, "held": 10_000}),
        Row("ingest", "redis layer, postgres", qos=1, error="no rows (exit 1)"),
    ]


def test_gateway_rates_are_divided_by_the_aiomqtt_rate_at_the_same_qos_only():
    assert run.add_ratios(rows()) == {3: 0.7, 4: 0.25}


def test_each_target_gets_a_verdict_and_what_was_not_measured_says_so():
    found = rows()
    verdicts = run.targets(found, run.add_ratios(found))
    assert "1 client, in-memory layer (memory, 1 client, flat out, QoS 0): 0.70x >= 0.6x: met" in verdicts
    assert "1 client, Redis layer (redis, 1 client, flat out, QoS 1): 0.25x >= 0.4x: NOT met" in verdicts
    assert "50 all-device clients: not measured" in verdicts
    assert any(
        v.startswith("p99 at 1,000 msg/s, 50 clients") and v.endswith("61.0 ms < 50 ms: NOT met") for v in verdicts
    )
    assert "command round trip p99 (memory sequential): 15.0 ms < 30 ms: met" in verdicts
    assert "idle WebSocket memory (memory layer (rungateway)): 37.7 KiB <= 64 KiB: met" in verdicts


def test_the_table_shows_failures_and_both_renderings_keep_every_row():
    found = rows()
    lines = run.table(found, run.add_ratios(found))
    assert len(lines) == len(found) + 1
    assert any("FAILED: no rows (exit 1)" in line[-1] for line in lines)
    assert run.render_text(lines).count("\n") == len(found) + 1  # header, rule, rows
    assert run.render_markdown(lines).count("\n") == len(found) + 1
