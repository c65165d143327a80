"""The one result format of the benchmark harness (``bench/run.py``).

Every benchmark script that the harness runs accepts ``--rows FILE`` and, when given it, writes there a JSON list of
``Row`` dicts (``write_rows``). The harness runs each script as a child process, reads its rows (``read_rows``),
adds the ratio to the raw aiomqtt subscriber measured in the same run and prints one table.

A row is one measured figure set. ``section`` groups rows in the table, ``case`` names the row within it;
``rate`` is messages (or commands) per second where that applies; ``ratio_base`` says which reference rate the
ratio is taken against (``"aiomqtt"`` for every gateway message rate, ``None`` for rows without a rate or for
the references themselves); ``extra`` holds short labelled figures for the last column (losses, memory, ...), and
``notes`` what limits the figure or what went wrong (``error`` set means the case failed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("limits", "ingest", "websocket", "commands", "idle")


@dataclass
class Row:
    section: str
    case: str
    qos: int | None = None
    rate: float | None = None  # msg/s (commands/s for the command section)
    p50_ms: float | None = None
    p99_ms: float | None = None
    ratio_base: str | None = None  # "aiomqtt": rate / the same run's raw aiomqtt rate at the same QoS
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def __post_init__(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"unknown section {self.section!r}: use one of {', '.join(SECTIONS)}")


def write_rows(path: str | Path, rows: list[Row]) -> None:
    Path(path).write_text(json.dumps([asdict(row) for row in rows], indent=2, default=str))


def read_rows(path: str | Path) -> list[Row]:
    data: list[dict[str, Any]] = json.loads(Path(path).read_text())
    return [Row(**item) for item in data]
