import time
from typing import Any

import pytest

from devices import selectors, services
from devices.models import Device, Fleet, FleetAccess
from devices.permissions import access_for
from devices.records import EventKind, Observation

pytestmark = pytest.mark.django_db


def store(device: str, n: int) -> list[int]:
    observations = [
        Observation(device_id=device, kind=EventKind.TELEMETRY, received_at=time.time(), body={"values": {"i": i}})
        for i in range(n)
    ]
    return [r.id for r in services.ingest(observations=observations, auto_register=True, max_devices=100).stored]


def test_events_after_returns_everything_under_the_cap_in_order():
    a = store("a", 3)
    b = store("b", 2)
    replay = selectors.events_after(after=a[0], device_ids=None, limit=100)
    assert [e.id for e in replay.events] == a[1:] + b and replay.gap is None
    only_b = selectors.events_after(after=0, device_ids={"b"}, limit=100)
    assert [e.id for e in only_b.events] == b


def test_events_after_beyond_the_cap_keeps_the_newest_and_reports_the_oldest_as_a_gap():
    ids = store("a", 10)
    replay = selectors.events_after(after=0, device_ids={"a"}, limit=4)
    assert [e.id for e in replay.events] == ids[-4:]
    assert replay.gap == (1, ids[-5])


def test_events_after_with_no_devices_is_empty():
    store("a", 2)
    assert selectors.events_after(after=0, device_ids=set(), limit=10).events == []


def test_last_event_id():
    assert selectors.last_event_id() == 0
    ids = store("a", 3)
    assert selectors.last_event_id() == ids[-1]


def test_fleet_grants_decide_what_a_user_sees(django_user_model):
    from django.contrib.auth.models import Group

    for device_id in ("a", "b", "c"):
        Device.objects.create(id=device_id)
    viewers, operators = Group.objects.create(name="viewers"), Group.objects.create(name="operators")
    north, south = Fleet.objects.create(name="north"), Fleet.objects.create(name="south")
    north.devices.add(*Device.objects.filter(id__in=["a", "b"]))
    south.devices.add(Device.objects.get(id="c"))
    FleetAccess.objects.create(fleet=north, group=viewers, level="view")
    FleetAccess.objects.create(fleet=south, group=operators, level="operate")
    alice = django_user_model.objects.create_user(username="alice")
    alice.groups.add(viewers, operators)
    bob = django_user_model.objects.create_user(username="bob")
    root = django_user_model.objects.create_superuser(username="root")

    access = access_for(alice)
    assert access.viewable == {"a", "b", "c"} and access.operable == {"c"}
    assert [d.id for d in selectors.device_list(access=access_for(bob))] == []
    assert access_for(root).everything and access_for(root).can_operate("zzz")
    assert selectors.visible_device_ids(access=access_for(bob), candidates=["a"]) == set()
    assert selectors.visible_device_ids(access=access, candidates=["a", "nope"]) == {"a"}


def test_events_purged_by_retention_are_reported_as_a_gap():
    old = [
        Observation(device_id="a", kind=EventKind.TELEMETRY, received_at=time.time() - 90 * 86400, body={"values": {}})
        for _ in range(3)
    ]
    purged = services.ingest(observations=old, auto_register=True, max_devices=10).stored
    kept = store("a", 2)
    services.purge_history(older_than=time.time() - 30 * 86400)
    replay = selectors.events_after(after=purged[0].id, device_ids={"a"}, limit=100)
    assert [e.id for e in replay.events] == kept
    assert replay.gap == (purged[0].id + 1, kept[0] - 1)
    assert selectors.events_after(after=purged[-1].id, device_ids={"a"}, limit=100).gap is None


# --- The HTTP API's reads: telemetry downsampling ------------------------------------------------------------------


Points = list[tuple[float, dict[str, Any]]]


def telemetry_at(device: str, points: Points) -> None:
    """Store telemetry received at exactly the given times (unix seconds)."""
    observations = [
        Observation(device_id=device, kind=EventKind.TELEMETRY, received_at=ts, body={"values": values})
        for ts, values in points
    ]
    services.ingest(observations=observations, auto_register=True, max_devices=100)


# Range [1000, 2000] in 4 buckets of 250 s: two points in the first, two in the second, none in the third, two in
# the last (2000 itself, the end, falls in the last bucket); 999 and 2001 are outside the range.
POINTS: Points = [
    (999.0, {"t": 100}),
    (1000.0, {"t": 1}),
    (1100.0, {"t": 3.0}),
    (1250.0, {"t": 10}),
    (1499.5, {"t": 20}),
    (1750.0, {"t": 5}),
    (2000.0, {"t": 7}),
    (2001.0, {"t": -100}),
]


def test_telemetry_with_more_points_than_buckets_is_aggregated_per_bucket():
    telemetry_at("a", POINTS)
    [series] = selectors.telemetry_series(device_id="a", metrics=["t"], start=1000, end=2000, buckets=4).values()
    assert series.bucket == 250
    assert series.t == [1000, 1250, 1750]
    assert series.min == [1, 10, 5]
    assert series.max == [3, 20, 7]
    assert series.mean == [2, 15, 6]
    assert series.count == [2, 2, 2]


def test_telemetry_with_at_most_as_many_points_as_buckets_comes_back_raw():
    telemetry_at("a", POINTS)
    for buckets in (6, 7):
        [series] = selectors.telemetry_series(
            device_id="a", metrics=["t"], start=1000, end=2000, buckets=buckets
        ).values()
        assert series.bucket is None
        assert series.t == [1000, 1100, 1250, 1499.5, 1750, 2000]
        assert series.min == series.max == series.mean == [1, 3, 10, 20, 5, 7]
        assert series.count == [1] * 6
    [bucketed] = selectors.telemetry_series(device_id="a", metrics=["t"], start=1000, end=2000, buckets=5).values()
    assert bucketed.bucket == 200 and sum(bucketed.count) == 6


def test_telemetry_skips_values_that_are_not_numbers():
    odd: Points = [(1010.0, {"t": True}), (1020.0, {"t": "hot"}), (1030.0, {"t": None}), (1040.0, {})]
    telemetry_at("a", POINTS + odd)
    [bucketed] = selectors.telemetry_series(device_id="a", metrics=["t"], start=1000, end=2000, buckets=4).values()
    assert bucketed.count == [2, 2, 2] and bucketed.min == [1, 10, 5] and bucketed.max == [3, 20, 7]
    [raw] = selectors.telemetry_series(device_id="a", metrics=["t"], start=1000, end=1100, buckets=10).values()
    assert raw.t == [1000, 1100] and raw.mean == [1, 3]


def test_telemetry_of_several_metrics_each_decides_raw_or_bucketed():
    more: Points = [(1300.0, {"rare": 4.5, "gps.lat": 1.5, "1": 2}), (1900.0, {"gps.lat": 2.5})]
    telemetry_at("a", POINTS + more)
    found = selectors.telemetry_series(
        device_id="a", metrics=["t", "rare", "gps.lat", "1", "missing"], start=1000, end=2000, buckets=4
    )
    assert found["t"].bucket == 250 and found["t"].count == [2, 2, 2]
    assert found["rare"].bucket is None and found["rare"].t == [1300] and found["rare"].mean == [4.5]
    assert found["gps.lat"].bucket is None and found["gps.lat"].mean == [1.5, 2.5]
    assert found["1"].mean == [2]  # a metric named like an array index is still a key
    assert found["missing"] == selectors.Series(bucket=None)


def test_telemetry_is_per_device():
    telemetry_at("a", POINTS)
    telemetry_at("b", [(1500.0, {"t": 1000})])
    [series] = selectors.telemetry_series(device_id="b", metrics=["t"], start=1000, end=2000, buckets=4).values()
    assert series.t == [1500] and series.max == [1000]


# --- Alerts, device pages, events, acknowledgements ------------------------------------------------------------------


def alert(device: str, severity: str, *, age: float = 0.0, name: str = "overheat") -> int:
    observation = Observation(
        device_id=device,
        kind=EventKind.EVENT,
        received_at=time.time() - age,
        body={"name": name, "severity": severity},
    )
    return services.ingest(observations=[observation], auto_register=True, max_devices=100).stored[0].id


def test_alerts_are_recent_unacknowledged_warnings_and_criticals(django_user_model):
    root = django_user_model.objects.create_superuser(username="root")
    access = access_for(root)
    alert("a", "warning")
    alert("a", "critical")
    alert("a", "info")
    alert("b", "critical", age=3700)  # older than the alert window
    acknowledged = alert("c", "warning")
    services.acknowledge_alerts(user=root, access=access, device_ids=["c"], event_ids=[acknowledged], now=time.time())
    telemetry_at("d", [(time.time(), {"t": 1})])
    assert selectors.alert_counts(access=access, now=time.time()) == {"a": 2}


def test_alert_counts_leave_out_devices_the_user_may_not_see(django_user_model):
    alert("a", "warning")
    bob = django_user_model.objects.create_user(username="bob")
    assert selectors.alert_counts(access=access_for(bob), now=time.time()) == {}


def test_a_device_page_filters_sorts_pages_and_counts(django_user_model):
    root = django_user_model.objects.create_superuser(username="root")
    Device.objects.create(id="b-1", name="Boiler", kind="heater", online=True)
    Device.objects.create(id="a-2", name="Attic", kind="sensor", online=False)
    Device.objects.create(id="c-3", name="cellar boiler", kind="sensor", online=True)
    Fleet.objects.create(name="north").devices.add(Device.objects.get(id="b-1"), Device.objects.get(id="a-2"))
    alert("c-3", "critical")
    now = time.time()

    def ids(sort="id", offset=0, limit=10, **filters):
        page = selectors.device_page(
            access=access_for(root),
            filters=selectors.DeviceFilters(**filters),
            sort=sort,
            offset=offset,
            limit=limit,
            now=now,
        )
        assert page.counts == selectors.DeviceCounts(online=2, offline=1, alerting=1)
        return [s.device.id for s in page.devices], page.total

    assert ids() == (["a-2", "b-1", "c-3"], 3)
    assert ids(online=True) == (["b-1", "c-3"], 2)
    assert ids(online=False) == (["a-2"], 1)
    assert ids(kind="sensor") == (["a-2", "c-3"], 2)
    assert ids(fleet="north") == (["a-2", "b-1"], 2)
    assert ids(q="BOILER") == (["b-1", "c-3"], 2)
    assert ids(q="-3") == (["c-3"], 1)
    assert ids(alerting=True) == (["c-3"], 1)
    assert ids(alerting=False) == (["a-2", "b-1"], 2)
    assert ids(sort="-name") == (["c-3", "b-1", "a-2"], 3)
    assert ids(sort="-id", offset=1, limit=1) == (["b-1"], 3)
    assert ids(kind="heater", online=False) == ([], 0)
    # total without a page's worth of devices: counted, from the page, or from the counts
    assert ids(kind="sensor", limit=1) == (["a-2"], 2)
    assert ids(kind="sensor", offset=1, limit=1) == (["c-3"], 2)
    assert ids(kind="sensor", offset=5) == ([], 2)
    assert ids(offset=5) == ([], 3)


def test_a_device_page_shows_fleets_and_alerts_of_each_device(django_user_model):
    root = django_user_model.objects.create_superuser(username="root")
    Device.objects.create(id="a")
    Fleet.objects.create(name="south").devices.add(Device.objects.get(id="a"))
    Fleet.objects.create(name="north").devices.add(Device.objects.get(id="a"))
    alert("a", "warning")
    [summary] = selectors.device_page(
        access=access_for(root), filters=selectors.DeviceFilters(), sort="id", offset=0, limit=10, now=time.time()
    ).devices
    assert summary.fleets == ["north", "south"] and summary.alerts == 1


def test_sorting_by_last_seen_puts_never_seen_devices_last_when_descending(django_user_model):
    root = django_user_model.objects.create_superuser(username="root")
    Device.objects.create(id="never")
    telemetry_at("old", [(1000.0, {"t": 1})])
    telemetry_at("new", [(2000.0, {"t": 1})])

    def order(sort):
        page = selectors.device_page(
            access=access_for(root), filters=selectors.DeviceFilters(), sort=sort, offset=0, limit=10, now=3000
        )
        return [s.device.id for s in page.devices]

    assert order("-last_seen") == ["new", "old", "never"]
    assert order("last_seen") == ["never", "old", "new"]


def test_device_events_filter_by_time_severity_and_page_by_id():
    ids = [alert("a", severity, age=age) for severity, age in [("info", 300), ("warning", 200), ("critical", 100)]]
    telemetry_at("a", [(time.time(), {"t": 1})])
    alert("b", "critical")
    now = time.time()
    assert [e.id for e in selectors.device_events(device_id="a")] == ids[::-1]
    assert [e.id for e in selectors.device_events(device_id="a", severities=["info", "critical"])] == [ids[2], ids[0]]
    assert [e.id for e in selectors.device_events(device_id="a", start=now - 250, end=now - 50)] == ids[:0:-1]
    assert [e.id for e in selectors.device_events(device_id="a", before=ids[2], limit=1)] == [ids[1]]


def test_latest_command_events_give_each_recent_commands_latest_state(django_user_model):
    root = django_user_model.objects.create_superuser(username="root")
    Device.objects.create(id="a", online=True)
    first, second = (
        services.request_command(
            user=root,
            access=access_for(root),
            device_id="a",
            name=name,
            params={},
            request_id=None,
            timeout=30,
            offline_policy="reject",
            max_payload=65536,
        ).command
        for name in ("one", "two")
    )
    services.mark_sent(command_id=first.id, owner="bridge")
    frames = selectors.latest_command_events(device_id="a")
    assert [(e.body["command_id"], e.body["state"]) for e in frames] == [(second.id, "pending"), (first.id, "sent")]
    assert [e.body["command_id"] for e in selectors.latest_command_events(device_id="a", limit=1)] == [second.id]


def test_acknowledgements_say_who_and_when(django_user_model):
    root = django_user_model.objects.create_superuser(username="root")
    event_id = alert("a", "warning")
    services.acknowledge_alerts(user=root, access=access_for(root), device_ids=["a"], event_ids=None, now=1234.5)
    assert selectors.acknowledgements(event_ids=[event_id, 999]) == {
        event_id: selectors.AcknowledgementRecord(event_id=event_id, by="root", at=1234.5)
    }


def test_device_facets_list_kinds_and_fleets_of_visible_devices_only(django_user_model):
    a, b, c, _ = Device.objects.bulk_create(
        [Device(id="a", kind="pump"), Device(id="b", kind="valve"), Device(id="c", kind="pump"), Device(id="d")]
    )
    north, south = Fleet.objects.create(name="north"), Fleet.objects.create(name="south")
    Fleet.objects.create(name="empty")
    north.devices.add(a, b)
    south.devices.add(c)
    everything = selectors.device_facets(access=access_for(django_user_model.objects.create_superuser("root")))
    assert everything == selectors.DeviceFacets(kinds=["pump", "valve"], fleets=["north", "south"])
    user = django_user_model.objects.create_user("viewer")
    group = user.groups.create(name="viewers")
    FleetAccess.objects.create(fleet=south, group=group)
    assert selectors.device_facets(access=access_for(user)) == selectors.DeviceFacets(kinds=["pump"], fleets=["south"])
