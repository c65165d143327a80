import math
import random
from typing import Any

import pytest

from devices import rollups, selectors, services
from devices.models import Event, TelemetryRollup
from devices.records import EventKind, Observation

pytestmark = pytest.mark.django_db

HOUR = rollups.HOUR
Points = list[tuple[float, dict[str, Any]]]


def ingest(device: str, points: Points) -> None:
    observations = [
        Observation(device_id=device, kind=EventKind.TELEMETRY, received_at=ts, body={"values": values})
        for ts, values in points
    ]
    services.ingest(observations=observations, auto_register=True, max_devices=100)


def stored_rollups() -> dict[tuple[str, str, int], tuple[float, float, float, int]]:
    rows = TelemetryRollup.objects.values_list("device_id", "metric", "hour", "min", "max", "total", "count")
    return {(device, metric, hour): (low, high, total, count) for device, metric, hour, low, high, total, count in rows}


def test_only_finite_numbers_are_rolled_up():
    body = {"values": {"t": 1, "f": 2.5, "on": True, "s": "hot", "n": None, "inf": math.inf}}
    assert dict(rollups.numeric_values(body)) == {"t": 1.0, "f": 2.5}
    assert list(rollups.numeric_values({"values": "not an object"})) == []


def test_ingest_keeps_min_max_sum_and_count_per_device_metric_and_hour():
    ingest("a", [(7200.0, {"t": 3}), (7300.0, {"t": -1, "h": 50}), (10799.9, {"t": 10})])
    ingest("a", [(9000.0, {"t": 20}), (10800.0, {"t": 0})])  # a second batch into the same hour, and the next hour
    ingest("b", [(7200.0, {"t": 100})])
    assert stored_rollups() == {
        ("a", "t", 2): (-1, 20, 32, 4),
        ("a", "h", 2): (50, 50, 50, 1),
        ("a", "t", 3): (0, 0, 0, 1),
        ("b", "t", 2): (100, 100, 100, 1),
    }


def test_rebuild_rolls_up_history_written_around_ingest():
    ingest("a", [(7200.0, {"t": 3}), (7300.0, {"t": 5})])
    before = stored_rollups()
    Event.objects.bulk_create([Event(device_id="a", kind="telemetry", ts=3700.0, body={"values": {"t": 9}})])
    assert rollups.rebuild(device_ids=["a"]) == 3
    assert stored_rollups() == {**before, ("a", "t", 1): (9, 9, 9, 1)}


def test_purge_drops_the_rollups_of_whole_hours_before_the_cutoff():
    ingest("a", [(100.0, {"t": 1}), (3700.0, {"t": 2}), (7300.0, {"t": 3})])
    services.purge_history(older_than=3700.0)
    assert sorted(hour for _, _, hour in stored_rollups()) == [1, 2]  # hour 1 holds the cutoff: it stays


def expected_buckets(points: Points, metric: str, *, start: float, end: float, buckets: int) -> list[tuple[Any, ...]]:
    """Brute force: whole-hour buckets counted from the hour ``start`` falls in, over the points in range."""
    hours = math.ceil((end - start) / buckets / HOUR)
    first = math.floor(start / HOUR)
    grouped: dict[int, list[float]] = {}
    for ts, values in points:
        if start <= ts <= end and metric in values:
            grouped.setdefault((math.floor(ts / HOUR) - first) // hours, []).append(values[metric])
    return [
        (max(start, (first + index * hours) * HOUR), min(found), max(found), sum(found) / len(found), len(found))
        for index, found in sorted(grouped.items())
    ]


@pytest.mark.parametrize("seed", range(4))
def test_long_ranges_read_whole_hours_from_rollups_and_exact_edges_from_events(seed):
    rng = random.Random(seed)
    points: Points = sorted(
        (rng.uniform(0, 12 * 86400), {"t": rng.randint(-50, 50), **({"h": rng.random()} if rng.random() < 0.3 else {})})
        for _ in range(3000)
    )
    ingest("a", points)
    ingest("b", [(ts, {"t": 1000}) for ts, _ in points[:100]])  # another device's values stay out
    start, end = rng.uniform(0, 86400), rng.uniform(10 * 86400, 12 * 86400)
    buckets = rng.choice([7, 50, 200])
    found = selectors.telemetry_series(device_id="a", metrics=["t", "h"], start=start, end=end, buckets=buckets)
    for metric in ("t", "h"):
        series = found[metric]
        assert series.bucket == math.ceil((end - start) / buckets / HOUR) * HOUR
        got = list(zip(series.t, series.min, series.max, series.mean, series.count, strict=True))
        want = expected_buckets(points, metric, start=start, end=end, buckets=buckets)
        assert len(got) <= buckets
        assert [row[0] for row in got] == [row[0] for row in want]
        assert [value for row in got for value in row[1:]] == pytest.approx(
            [value for row in want for value in row[1:]]
        )


def test_a_sparse_metric_over_a_long_range_still_comes_back_raw():
    ingest("a", [(HOUR * 5.5, {"t": 1}), (HOUR * 30.25, {"t": 2})])
    [series] = selectors.telemetry_series(device_id="a", metrics=["t"], start=0, end=HOUR * 48, buckets=24).values()
    assert series.bucket is None and series.t == [HOUR * 5.5, HOUR * 30.25]
