import time

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
