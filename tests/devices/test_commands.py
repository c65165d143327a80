"""The command lifecycle in the database (contract section 2): request, claim, sent, reply, expiry."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from devices import selectors, services
from devices.models import Command, Device, Event, Fleet, FleetAccess
from devices.permissions import access_for
from devices.records import Reply
from devices.services import CommandRefused

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_superuser(username="op", password="x")


@pytest.fixture
def online_device():
    return Device.objects.create(id="dev-1", online=True)


def request(user, device_id="dev-1", name="reboot", params=None, request_id=None, timeout=30, policy="reject"):
    return services.request_command(
        user=user,
        access=access_for(user),
        device_id=device_id,
        name=name,
        params=params or {},
        request_id=request_id,
        timeout=timeout,
        offline_policy=policy,
        max_payload=65536,
    )


def nested(depth: int) -> dict[str, object]:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return {"deep": value}


def command_states(command_id: str) -> list[str]:
    events = Event.objects.filter(kind="command", body__command_id=command_id).order_by("id")
    return [e.body["state"] for e in events]


def test_a_command_is_stored_pending_with_an_event(operator, online_device):
    outcome = request(operator, params={"delay": 1}, request_id="r-1")
    command = outcome.command
    assert outcome.created and command.state == "pending" and command.requested_by == operator
    assert command.expires_at - command.created_at == timedelta(seconds=30)
    assert outcome.events[0].body == {
        "command_id": command.id,
        "name": "reboot",
        "state": "pending",
        "request_id": "r-1",
    }


def test_the_same_request_id_within_a_day_returns_the_existing_command(operator, online_device):
    first = request(operator, request_id="same")
    again = request(operator, request_id="same", params={"other": True})
    assert not again.created and again.command.id == first.command.id and again.events == []
    assert Command.objects.count() == 1
    Command.objects.update(created_at=timezone.now() - timedelta(hours=25))
    assert request(operator, request_id="same").created


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"name": "a/b"}, "bad_command"),
        ({"name": "+"}, "bad_command"),
        ({"name": "#"}, "bad_command"),
        ({"name": "$SYS"}, "bad_command"),
        ({"name": "x\x00"}, "bad_command"),
        ({"name": ""}, "bad_command"),
        ({"device_id": "dev/+"}, "unknown_device"),
        ({"device_id": "#"}, "unknown_device"),
        ({"device_id": "ghost"}, "unknown_device"),
        ({"params": [1, 2]}, "bad_command"),
        ({"timeout": 0}, "bad_command"),
        ({"timeout": 99999}, "bad_command"),
        ({"params": {"blob": "x" * 70000}}, "too_large"),
        ({"params": nested(40)}, "bad_command"),
        ({"params": {"s": "x\x00"}}, "bad_command"),
        ({"params": {"x\x00": 1}}, "bad_command"),
        ({"params": {"n": float("inf")}}, "bad_command"),
        ({"params": {"n": 2**64}}, "bad_command"),
        ({"params": {"o": object()}}, "bad_command"),
        ({"request_id": "r\x00"}, "bad_command"),
    ],
)
def test_malformed_commands_are_refused_and_never_stored(operator, online_device, kwargs, code):
    with pytest.raises(CommandRefused) as refused:
        request(operator, **kwargs)
    assert refused.value.code == code
    assert not Command.objects.exists()


def test_an_offline_device_rejects_at_once_or_holds(operator):
    Device.objects.create(id="dev-1", online=False)
    rejected = request(operator).command
    assert rejected.state == "rejected" and rejected.error == "device_offline" and rejected.finished_at
    held = request(operator, policy="hold").command
    assert held.state == "pending"
    assert services.claim_commands(owner="b", lease=10, limit=10, hold_offline=True) == []
    Device.objects.filter(id="dev-1").update(online=True)
    assert [c.id for c in services.claim_commands(owner="b", lease=10, limit=10, hold_offline=True)] == [held.id]


def test_a_viewer_without_operate_gets_a_rejected_command_and_others_see_nothing(django_user_model, online_device):
    viewer = django_user_model.objects.create_user(username="viewer")
    group = Group.objects.create(name="viewers")
    viewer.groups.add(group)
    fleet = Fleet.objects.create(name="f")
    fleet.devices.add(online_device)
    FleetAccess.objects.create(fleet=fleet, group=group, level="view")
    command = request(viewer).command
    assert command.state == "rejected" and command.error == "forbidden"
    stranger = django_user_model.objects.create_user(username="stranger")
    with pytest.raises(CommandRefused) as refused:
        request(stranger)
    assert refused.value.code == "unknown_device"


def test_exactly_one_claimant_until_the_lease_lapses(operator, online_device):
    command = request(operator).command
    first = services.claim_commands(owner="bridge-a", lease=10, limit=10, hold_offline=False)
    assert [c.id for c in first] == [command.id] and first[0].params == {}
    assert services.claim_commands(owner="bridge-b", lease=10, limit=10, hold_offline=False) == []
    Command.objects.update(lease_until=timezone.now() - timedelta(seconds=1))
    again = services.claim_commands(owner="bridge-b", lease=10, limit=10, hold_offline=False)
    assert [c.id for c in again] == [command.id]
    assert Command.objects.get().attempts == 2


def test_sent_then_a_reply_gives_the_final_state_once(operator, online_device):
    command = request(operator).command
    services.claim_commands(owner="b", lease=10, limit=10, hold_offline=False)
    assert services.mark_sent(command_id=command.id, owner="b")[0].body["state"] == "sent"
    assert services.mark_sent(command_id=command.id, owner="b") == []
    reply = Reply(device_id="dev-1", command_id=command.id, ok=True, received_at=0.0, result={"done": 1})
    outcome = services.record_replies(replies=[reply])
    assert [e.body["state"] for e in outcome.events] == ["succeeded"]
    assert outcome.events[0].body["result"] == {"done": 1}
    late = services.record_replies(replies=[reply])
    assert late.late == 1 and late.events == []
    assert command_states(command.id) == ["pending", "sent", "succeeded"]
    late_reply = Command.objects.get().late_reply
    assert late_reply is not None and late_reply["ok"] is True


def test_replies_for_unknown_ids_or_another_devices_command_are_counted_and_ignored(operator, online_device):
    command = request(operator).command
    Device.objects.create(id="dev-2", online=True)
    outcome = services.record_replies(
        replies=[
            Reply(device_id="dev-1", command_id="nope", ok=True, received_at=0.0),
            Reply(device_id="dev-2", command_id=command.id, ok=False, received_at=0.0, error="spoof"),
        ]
    )
    assert outcome.unknown == 2 and outcome.events == []
    assert Command.objects.get().state == "pending"


def test_a_failed_reply(operator, online_device):
    command = request(operator).command
    outcome = services.record_replies(
        replies=[Reply(device_id="dev-1", command_id=command.id, ok=False, received_at=0.0, error="jammed")]
    )
    assert outcome.events[0].body["state"] == "failed" and outcome.events[0].body["error"] == "jammed"


def test_expiry_distinguishes_never_sent_sent_and_unknown_outcome(operator, online_device):
    never = request(operator, name="never").command
    sent = request(operator, name="sent").command
    unknown = request(operator, name="unknown").command
    services.claim_commands(owner="b", lease=10, limit=10, hold_offline=False)  # all three: attempts 1
    Command.objects.filter(id=never.id).update(attempts=0)
    services.mark_sent(command_id=sent.id, owner="b")
    # The bridge that published `unknown` died before recording `sent`.
    events = services.expire_commands(command_ids=[never.id, sent.id, unknown.id])
    states = {e.body["name"]: (e.body["state"], e.body.get("error")) for e in events}
    assert states == {
        "never": ("expired", "no reply before the deadline"),
        "sent": ("expired", "no reply before the deadline"),
        "unknown": ("failed", "outcome_unknown"),
    }
    assert services.expire_commands(command_ids=[never.id]) == []


def test_wall_clock_sweep_catches_orphans(operator, online_device):
    command = request(operator, timeout=1).command
    assert services.expire_commands(overdue_before=timezone.now()) == []
    events = services.expire_commands(overdue_before=timezone.now() + timedelta(seconds=5))
    assert [e.body["command_id"] for e in events] == [command.id]


def test_wall_clock_sweep_leaves_what_the_calling_bridge_holds(operator, online_device):
    """A bridge's own commands expire by its monotonic clock: a wall clock stepped forward must not expire them."""
    held = request(operator, timeout=1).command
    orphan = request(operator, name="orphan", timeout=1).command
    events = services.expire_commands(overdue_before=timezone.now() + timedelta(hours=1), held=[held.id])
    assert [e.body["command_id"] for e in events] == [orphan.id]


def test_command_event_and_recent_commands(operator, online_device):
    command = request(operator).command
    services.claim_commands(owner="b", lease=10, limit=10, hold_offline=False)
    services.mark_sent(command_id=command.id, owner="b")
    latest = selectors.command_event(command_id=command.id, device_id="dev-1")
    assert latest is not None and latest.body["state"] == "sent"
    assert [c.id for c in selectors.recent_commands(device_id="dev-1")] == [command.id]


def test_a_command_that_cannot_be_published_fails_once(operator, online_device):
    command = request(operator).command
    assert [e.body["state"] for e in services.fail_command(command_id=command.id, error="publish_error: x")] == [
        "failed"
    ]
    assert services.fail_command(command_id=command.id, error="again") == []
