#!/usr/bin/env python
"""HTTP API reads at scale: telemetry history over a year, and the device list with 5,000 devices.

Builds a fresh database (SQLite in a temporary directory, or a fresh PostgreSQL database next to the one
``--postgres`` names), fills it with ``bulk_create`` and times requests through Django's test client, in process
(no network, no server: the view, the queries and the JSON, which is what the database choices change):

* ``telemetry``: one device with one metric at one point per minute for a year (525,600 events), asked for a year
  (300 and 2,000 buckets), a day and an hour; also the same device's other metrics left out of the query.
* ``devices``: 5,000 devices in 5 kinds and 2 fleets, the last hour of their telemetry at one point per minute
  (300,000 events, what the alert count scans past), 500 alerts of which 100 are acknowledged; the list with
  ``limit=100`` as a superuser and as a user whose grants cover every device, with filters and sorts.

    python bench/api_reads.py [--postgres postgres://postgres@127.0.0.1:5432/postgres] [--repeat N] [--quick]

Results go to ``bench/results/api_reads-<vendor>.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
YEAR_MINUTES = 365 * 24 * 60
BENCH_DB = "api_reads_bench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", help="a PostgreSQL URL; the bench creates and drops its own database there")
    parser.add_argument("--repeat", type=int, default=15, help="timed requests per case (after 2 warm-ups)")
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="a tenth of the data, for trying the script")
    return parser.parse_args(argv)


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    """A DATABASE_URL for a fresh, empty database, removed afterwards."""
    if not args.postgres:
        with tempfile.TemporaryDirectory(prefix="api-reads-") as tmp:
            yield f"sqlite:///{tmp}/bench.sqlite3"
        return
    import psycopg

    admin = psycopg.connect(args.postgres, autocommit=True)
    admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DB}")
    admin.execute(f"CREATE DATABASE {BENCH_DB}")
    try:
        yield urlunsplit(urlsplit(args.postgres)._replace(path=f"/{BENCH_DB}"))
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        admin.close()


def setup_django(database_url: str) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_SECRET_KEY="bench",
        GATEWAY_ENV_FILE="/nonexistent",
        DATABASE_URL=database_url,
        DJANGO_ALLOWED_HOSTS="testserver",
        GATEWAY_LOG_LEVEL="ERROR",
    )
    sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def timed(what: str, build: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = build()
    print(f"  built {what} in {time.perf_counter() - started:.1f} s", flush=True)
    return result


def build_year(rows: int) -> float:
    """One device, one metric ``temp`` (and a string ``fw`` beside it) every minute, and its hourly rollups;
    returns the last time."""
    from devices import rollups
    from devices.models import Device, Event

    end = time.time()
    start = end - rows * 60
    Device.objects.create(id="year", latest={"temp": 0.0})
    batch: list[Event] = []
    for minute in range(rows):
        value = round(20 + 5 * math.sin(minute / 1440 * 2 * math.pi) + (minute % 7) / 10, 2)
        batch.append(
            Event(
                device_id="year",
                kind="telemetry",
                ts=start + minute * 60,
                body={"values": {"temp": value, "fw": "2.4.1"}},
            )
        )
        if len(batch) == 10_000:
            Event.objects.bulk_create(batch)
            batch = []
    Event.objects.bulk_create(batch)
    rollups.rebuild(device_ids=["year"])  # what ingest would have kept
    return end


def build_devices(count: int) -> None:
    """``count`` devices with an hour of telemetry each, alerts, fleets, and a viewer granted all of them."""
    from datetime import UTC, datetime

    from django.contrib.auth.models import Group, User

    from devices.models import Acknowledgement, Device, Event, Fleet, FleetAccess

    now = time.time()
    seen = datetime.fromtimestamp(now, tz=UTC)
    kinds = ["sensor", "heater", "pump", "meter", "valve"]
    Device.objects.bulk_create(
        [
            Device(
                id=f"dev-{n:05d}",
                name=f"Device {n} {kinds[n % 5]}",
                kind=kinds[n % 5],
                online=n % 3 != 0,
                last_seen=seen,
                latest={"temp": 20.5, "hum": 40, "fw": "2.4.1"},
                latest_ts=now,
            )
            for n in range(count)
        ],
        batch_size=1000,
    )
    ids = [f"dev-{n:05d}" for n in range(count)]
    north, south = Fleet.objects.create(name="north"), Fleet.objects.create(name="south")
    north.devices.add(*Device.objects.filter(id__in=ids[: count // 2]))
    south.devices.add(*Device.objects.filter(id__in=ids[count // 2 :]))
    batch = []
    for minute in range(60):
        for device_id in ids:
            batch.append(
                Event(
                    device_id=device_id,
                    kind="telemetry",
                    ts=now - 3600 + minute * 60,
                    body={"values": {"temp": 20.5, "hum": 40}},
                )
            )
        Event.objects.bulk_create(batch, batch_size=5000)
        batch = []
    alerts = Event.objects.bulk_create(
        [
            Event(
                device_id=ids[n % 300],
                kind="event",
                ts=now - n * 7,
                body={"name": "overheat", "severity": "warning" if n % 2 else "critical"},
            )
            for n in range(500)
        ]
    )
    admin = User.objects.get(username="bench-root")
    Acknowledgement.objects.bulk_create(
        [
            Acknowledgement(
                event_id=e.id, device_id=e.device_id, event_ts=e.ts, acknowledged_by=admin, acknowledged_at=seen
            )
            for e in alerts[:100]
        ]
    )
    viewer = User.objects.create_user(username="bench-viewer")
    group = Group.objects.create(name="bench-viewers")
    for fleet in (north, south):
        FleetAccess.objects.create(fleet=fleet, group=group, level="view")
    viewer.groups.add(group)


def client_for(username: str) -> Any:
    from django.contrib.auth.models import User
    from django.test import Client

    from devices import services

    client = Client()
    client.defaults["HTTP_AUTHORIZATION"] = "Bearer " + services.issue_token(user=User.objects.get(username=username))
    return client


def measure(client: Any, url: str, repeat: int) -> dict[str, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(2):
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code, response.content[:300])
    times = []
    for _ in range(repeat):
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "url": url,
        "median_ms": round(statistics.median(times), 1),
        "min_ms": round(times[0], 1),
        "p90_ms": round(times[int(len(times) * 0.9) - 1], 1),
        "queries": len(queries),
        "bytes": len(response.content),
    }


def telemetry_cases(end: float, rows: int) -> list[tuple[str, str, str]]:
    path = "/api/devices/year/telemetry?metrics=temp"
    year = f"{path}&start={end - rows * 60}&end={end}"
    return [
        ("telemetry: a year, 300 buckets", "bench-root", year),
        ("telemetry: a year, 2000 buckets", "bench-root", f"{year}&buckets=2000"),
        ("telemetry: 30 days, 300 buckets", "bench-root", f"{path}&start={end - 30 * 86400}&end={end}"),
        ("telemetry: a day, 300 buckets", "bench-root", f"{path}&start={end - 86400}&end={end}"),
        ("telemetry: an hour (raw)", "bench-root", f"{path}&start={end - 3600}&end={end}"),
    ]


def device_cases(devices: int) -> list[tuple[str, str, str]]:
    return [
        ("devices: limit 100, superuser", "bench-root", "/api/devices?limit=100"),
        ("devices: limit 100, viewer of all", "bench-viewer", "/api/devices?limit=100"),
        ("devices: q=heater, -last_seen", "bench-root", "/api/devices?limit=100&q=heater&sort=-last_seen"),
        ("devices: alerting=true", "bench-root", "/api/devices?limit=100&alerting=true"),
        ("devices: kind, online, fleet", "bench-viewer", "/api/devices?limit=100&kind=pump&online=true&fleet=south"),
        ("devices: last page", "bench-root", f"/api/devices?limit=100&offset={devices - 100}&sort=name"),
    ]


def measure_all(cases: list[tuple[str, str, str]], repeat: int) -> list[dict[str, Any]]:
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
    found = []
    for name, username, path in cases:
        result = {"case": name, **measure(client_for(username), path, repeat)}
        found.append(result)
        print(
            f"  {name:<36} median {result['median_ms']:>7} ms  min {result['min_ms']:>7} ms  "
            f"p90 {result['p90_ms']:>7} ms  {result['queries']} queries  {result['bytes']:,} bytes",
            flush=True,
        )
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The telemetry cases run before the devices exist: in the bench one device holds every year of history, and
    planners that see it as most of the table pick other plans for it than for one device among thousands."""
    scale = 10 if args.quick else 1
    results: dict[str, Any] = {}
    with database(args) as url:
        setup_django(url)
        from django.contrib.auth.models import User
        from django.db import connection

        results["vendor"] = connection.vendor
        print(f"database: {connection.vendor} ({connection.settings_dict['NAME']})", flush=True)
        User.objects.create_superuser(username="bench-root")
        year_rows = YEAR_MINUTES // scale
        end = timed(f"a year of telemetry ({year_rows:,} events)", lambda: build_year(year_rows))
        results["telemetry"] = measure_all(telemetry_cases(end, year_rows), args.repeat)
        devices = args.devices // scale
        timed(f"{devices:,} devices with an hour of telemetry", lambda: build_devices(devices))
        results["devices"] = measure_all(device_cases(devices), args.repeat)
        connection.close()
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    results = run(args)
    results["repeat"] = args.repeat
    results["quick"] = args.quick
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"api_reads-{results['vendor']}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
