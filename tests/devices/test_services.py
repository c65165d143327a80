import time
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from devices import selectors, services
from devices.models import Acknowledgement, Device, Event, Lease
from devices.records import EventKind, Observation, Rejection

pytestmark = pytest.mark.django_db


def telemetry(device: str, seq: int | None = None, **values: object) -> Observation:
    return Observation(
        device_id=device, kind=EventKind.TELEMETRY, received_at=time.time(), body={"values": values}, seq=seq
    )


def status(device: str, online: bool) -> Observation:
    return Observation(device_id=device, kind=EventKind.STATUS, received_at=time.time(), body={"online": online})


def ingest(*observations: Observation, auto_register: bool = True, max_devices: int = 100):
    return services.ingest(observations=list(observations), auto_register=auto_register, max_devices=max_devices)


def test_a_batch_is_stored_in_order_and_registers_devices():
    result = ingest(telemetry("a", temp=1), telemetry("b", temp=2), telemetry("a", temp=3, hum=4))
    assert [record.device_id for record in result.stored] == ["a", "b", "a"]
    ids = [record.id for record in result.stored]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert sorted(result.registered) == ["a", "b"]
    a = Device.objects.get(id="a")
    assert a.latest == {"temp": 3, "hum": 4}
    assert a.last_seen is not None and a.online is False


def test_a_seq_already_stored_is_dropped_as_a_duplicate():
    ingest(telemetry("a", seq=1, temp=1))
    result = ingest(telemetry("a", seq=1, temp=1), telemetry("a", seq=2, temp=2), telemetry("a", seq=2, temp=2))
    assert [r.body["values"]["temp"] for r in result.stored] == [2]
    assert result.skipped == {Rejection.DUPLICATE: 2}
    assert Event.objects.filter(device_id="a").count() == 2


def test_the_same_seq_on_two_devices_is_not_a_duplicate():
    result = ingest(telemetry("a", seq=7, temp=1), telemetry("b", seq=7, temp=1))
    assert len(result.stored) == 2


def test_a_status_equal_to_the_stored_one_records_nothing():
    assert len(ingest(status("a", True)).stored) == 1
    repeated = ingest(status("a", True))
    assert repeated.stored == [] and repeated.skipped == {Rejection.UNCHANGED_STATUS: 1}
    assert len(ingest(status("a", False)).stored) == 1
    assert Device.objects.get(id="a").online is False


def test_the_first_status_of_a_new_device_is_recorded_even_when_offline():
    assert len(ingest(status("fresh", False)).stored) == 1


def test_auto_registration_off_skips_unknown_devices():
    Device.objects.create(id="known")
    result = ingest(telemetry("known", temp=1), telemetry("stranger", temp=1), auto_register=False)
    assert [r.device_id for r in result.stored] == ["known"]
    assert result.skipped == {Rejection.UNKNOWN_DEVICE: 1}
    assert not Device.objects.filter(id="stranger").exists()


def test_the_device_cap_rejects_new_ids_past_it():
    result = ingest(telemetry("a", temp=1), telemetry("b", temp=1), telemetry("c", temp=1), max_devices=2)
    assert sorted(result.registered) == ["a", "b"]
    assert result.skipped == {Rejection.DEVICE_CAP: 1}


def test_purge_removes_only_old_events():
    old = Observation(
        device_id="a",
        kind=EventKind.TELEMETRY,
        received_at=time.time() - 40 * 86400,
        body={"values": {"t": 1}},
    )
    ingest(old, telemetry("a", t=2))
    assert services.purge_history(older_than=time.time() - 30 * 86400) == 1
    assert Event.objects.count() == 1


def test_purge_removes_the_acknowledgements_of_purged_events():
    now = time.time()
    for ts in (now - 40 * 86400, now):
        ingest(Observation(device_id="a", kind=EventKind.EVENT, received_at=ts, body={"severity": "warning"}))
    old_id, new_id = Event.objects.order_by("id").values_list("id", flat=True)
    for event_id, ts in ((old_id, now - 40 * 86400), (new_id, now)):
        Acknowledgement.objects.create(event_id=event_id, device_id="a", event_ts=ts, acknowledged_at=timezone.now())
    services.purge_history(older_than=now - 30 * 86400)
    assert list(Acknowledgement.objects.values_list("event_id", flat=True)) == [new_id]


def test_deleting_a_device_deletes_its_history():
    ingest(telemetry("a", t=1), telemetry("b", t=1))
    Device.objects.get(id="a").delete()
    assert list(Event.objects.values_list("device_id", flat=True)) == ["b"]


def test_tokens_are_stored_hashed_and_can_be_revoked():
    user = get_user_model().objects.create_user(username="script", password="x")
    token = services.issue_token(user=user, name="ci")
    stored = user.api_tokens.get()
    assert token not in (stored.key_hash, stored.prefix) and stored.key_hash == services.hash_token(token)
    assert selectors.user_for_token(token=token) == user
    services.revoke_token(token_id=stored.id)
    assert selectors.user_for_token(token=token) is None
    assert selectors.user_for_token(token="gw_guess") is None


def test_ensure_operator_creates_once():
    password = services.ensure_operator(username="operator")
    assert password and get_user_model().objects.get(username="operator").check_password(password)
    assert services.ensure_operator(username="operator") is None


def test_token_use_is_recorded_at_most_once_a_minute():
    user = get_user_model().objects.create_user(username="script2", password="x")
    services.issue_token(user=user)
    stored = user.api_tokens.get()
    services.touch_token(token_id=stored.id)
    stored.refresh_from_db()
    first = stored.last_used
    assert first is not None
    services.touch_token(token_id=stored.id)
    stored.refresh_from_db()
    assert stored.last_used == first


class TestLeases:
    def test_first_owner_takes_the_lease_and_renews_it(self, db: None) -> None:
        assert services.hold_lease(name="status", owner="a", ttl=10)
        assert services.hold_lease(name="status", owner="a", ttl=10)

    def test_another_owner_waits_until_it_lapses(self, db: None) -> None:
        assert services.hold_lease(name="status", owner="a", ttl=10)
        assert not services.hold_lease(name="status", owner="b", ttl=10)
        Lease.objects.filter(name="status").update(until=timezone.now() - timedelta(seconds=1))
        assert services.hold_lease(name="status", owner="b", ttl=10)
        assert not services.hold_lease(name="status", owner="a", ttl=10)

    def test_release_hands_it_over_at_once(self, db: None) -> None:
        assert services.hold_lease(name="status", owner="a", ttl=10)
        services.release_lease(name="status", owner="b")  # not b's to release
        assert not services.hold_lease(name="status", owner="b", ttl=10)
        services.release_lease(name="status", owner="a")
        assert services.hold_lease(name="status", owner="b", ttl=10)
