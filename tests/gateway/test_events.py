"""gateway.events: group names, the frames of contract section 3, and the numbered layer messages."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
import redis
from channels.layers import BaseChannelLayer, InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.records import EventKind, EventRecord
from gateway.events import (
    EVENTS_GROUP,
    EVENTS_MESSAGE_TYPE,
    EventsPublisher,
    batch_frame,
    event_frame,
    gap_frame,
    group_name,
    keep_membership,
    parse_events_message,
    wire_event,
)
from tests.support import require_redis

CHANNELS = BaseChannelLayer()


def channels_accepts(name):
    try:
        return CHANNELS.require_valid_group_name(name)
    except TypeError:
        return False


def record(event_id=1, device="s1", kind=EventKind.TELEMETRY, body=None, ts=1700000000.5, device_ts=None):
    return EventRecord(
        id=event_id,
        device_id=device,
        kind=kind,
        ts=ts,
        body={"values": {"temp": 21.5}} if body is None else body,
        device_ts=device_ts,
    )


# --- group names --------------------------------------------------------------------------------------------


def test_events_group():
    assert EVENTS_GROUP == "gateway.events"
    assert channels_accepts(EVENTS_GROUP)


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("device", "sensor-1"), "device.sensor-1"),
        (("device", "s_1.a"), "device.s_1.a"),
        (("x",), "x"),
        (("a" * 99,), "a" * 99),
        (("user", "42"), "user.42"),
    ],
)
def test_group_name_accepts_what_channels_accepts(parts, expected):
    assert group_name(*parts) == expected
    assert channels_accepts(expected)


@pytest.mark.parametrize(
    "parts",
    [
        (),
        ("",),
        ("a" * 100,),
        ("a" * 50, "b" * 49),  # 100 with the dot
        ("device", "s 1"),
        ("device", "s/1"),
        ("device", "s:1"),
        ("device", "s!1"),
        ("device", "é"),
        ("device", "s*"),
    ],
)
def test_group_name_rejects_what_channels_rejects(parts):
    assert not channels_accepts(".".join(parts)) or not parts
    with pytest.raises(ValueError, match="invalid channel-layer group name"):
        group_name(*parts)


@pytest.mark.parametrize("name", ["gateway\n", "device.\u0661\u0662"])
def test_group_name_is_stricter_than_channels_regex_quirks(name):
    # Channels' regex uses $ and \d: it lets a trailing newline and non-ASCII digits through; group_name keeps
    # to what Channels documents (ASCII letters, digits, - _ .).
    with pytest.raises(ValueError):
        group_name(name)


group_alphabet = st.sampled_from([*"abzAZ09-_.", " ", "/", "!", "é", ":", "\n", "\u0661", "*"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=group_alphabet, max_size=60), min_size=1, max_size=3))
def test_group_name_never_accepts_a_name_channels_refuses(parts):
    joined = ".".join(parts)
    try:
        name = group_name(*parts)
    except ValueError:
        ascii_clean = all(char.isascii() and char != "\n" for char in joined)
        assert not channels_accepts(joined) or not ascii_clean
    else:
        assert name == joined
        assert channels_accepts(name)


# --- frames -------------------------------------------------------------------------------------------------


def test_telemetry_frame():
    frame = event_frame(record(7, "s1", EventKind.TELEMETRY, {"values": {"temp": 21.5, "gps.lat": 1.5}}))
    assert frame == {
        "type": "telemetry",
        "id": 7,
        "device": "s1",
        "ts": 1700000000.5,
        "values": {"temp": 21.5, "gps.lat": 1.5},
    }


def test_telemetry_frame_with_device_ts():
    frame = event_frame(record(device_ts=1699999999.0))
    assert frame["device_ts"] == 1699999999.0


def test_frames_without_device_ts_omit_the_key():
    assert "device_ts" not in event_frame(record())


def test_status_frame():
    assert event_frame(record(3, "s2", EventKind.STATUS, {"online": False}, ts=5.0)) == {
        "type": "status",
        "id": 3,
        "device": "s2",
        "ts": 5.0,
        "online": False,
    }


def test_event_frame():
    body = {"name": "overheat", "severity": "critical", "message": "hot", "data": {"temp": 91}}
    frame = event_frame(record(4, "s1", EventKind.EVENT, body, ts=6.0))
    assert frame == {"type": "event", "id": 4, "device": "s1", "ts": 6.0, **body}


def test_command_frame():
    body = {"command_id": "c-1", "name": "reboot", "state": "succeeded", "result": {"ok": 1}, "request_id": "r1"}
    frame = event_frame(record(5, "s1", EventKind.COMMAND, body, ts=7.0))
    assert frame == {"type": "command", "id": 5, "device": "s1", "ts": 7.0, **body}


def test_every_frame_carries_id_device_and_ts():
    for kind, body in [
        (EventKind.TELEMETRY, {"values": {}}),
        (EventKind.STATUS, {"online": True}),
        (EventKind.EVENT, {"name": "n", "severity": "info"}),
        (EventKind.COMMAND, {"command_id": "c", "name": "n", "state": "sent"}),
    ]:
        frame = event_frame(record(9, "dev", kind, body))
        assert frame["type"] == kind.value
        assert (frame["id"], frame["device"], frame["ts"]) == (9, "dev", 1700000000.5)


def test_wire_event_carries_the_serialized_frame():
    item = record(11, "s9", device_ts=3.5)
    wired = wire_event(item)
    assert (wired["id"], wired["device"]) == (11, "s9")
    assert orjson.loads(wired["frame"]) == event_frame(item)


def test_batch_frame_of_one_is_the_frame_itself():
    frame = wire_event(record(1))["frame"]
    assert batch_frame([frame]) == frame


def test_batch_frame_is_valid_json_holding_every_event():
    frames = [wire_event(record(event_id))["frame"] for event_id in (1, 2, 3)]
    batch = orjson.loads(batch_frame(frames))
    assert batch["type"] == "batch"
    assert [event["id"] for event in batch["events"]] == [1, 2, 3]


def test_empty_batch_frame_is_valid_json():
    assert orjson.loads(batch_frame([])) == {"type": "batch", "events": []}


def test_gap_frame():
    assert orjson.loads(gap_frame(5, 9)) == {"type": "gap", "from": 5, "to": 9}


# --- the numbered layer messages ----------------------------------------------------------------------------


def test_publisher_numbers_its_messages():
    publisher = EventsPublisher("bridge-a")
    first = publisher.message([record(1), record(2, "s2")])
    empty = publisher.message([])
    third = publisher.message([record(5)])
    assert [m["seq"] for m in (first, empty, third)] == [1, 2, 3]
    assert all(m["type"] == EVENTS_MESSAGE_TYPE and m["source"] == "bridge-a" for m in (first, empty, third))
    assert first["events"] == [wire_event(record(1)), wire_event(record(2, "s2"))]
    assert empty["events"] == []


def test_publishers_number_independently():
    a, b = EventsPublisher("a"), EventsPublisher("b")
    a.message([record(1)])
    assert (b.message([record(2)])["seq"], b.message([])["seq"]) == (1, 2)


def test_published_messages_pass_the_parser_and_are_msgpack_friendly():
    message = EventsPublisher("bridge-a").message([record(1)])
    assert parse_events_message(dict(message)) == message
    # channels_redis serializes with msgpack: only plain types
    assert orjson.loads(orjson.dumps(message)) == message


def good_message(**changes):
    message = dict(EventsPublisher("bridge-a").message([record(1)]))
    message.update(changes)
    return message


@pytest.mark.parametrize(
    "message",
    [
        pytest.param({}, id="empty"),
        pytest.param(good_message(type="gateway.other"), id="other_type"),
        pytest.param({k: v for k, v in good_message().items() if k != "type"}, id="no_type"),
        pytest.param({k: v for k, v in good_message().items() if k != "events"}, id="no_events"),
        pytest.param({k: v for k, v in good_message().items() if k != "source"}, id="no_source"),
        pytest.param({k: v for k, v in good_message().items() if k != "seq"}, id="no_seq"),
        pytest.param(good_message(events="x"), id="events_not_list"),
        pytest.param(good_message(events={"id": 1}), id="events_dict"),
        pytest.param(good_message(source=1), id="source_not_str"),
        pytest.param(good_message(seq="1"), id="seq_str"),
        pytest.param(good_message(seq=1.0), id="seq_float"),
        pytest.param(good_message(seq=True), id="seq_bool"),
        pytest.param(good_message(events=[1]), id="event_not_dict"),
        pytest.param(good_message(events=[{"device": "s1", "frame": "{}"}]), id="event_without_id"),
        pytest.param(good_message(events=[{"id": "1", "device": "s1", "frame": "{}"}]), id="event_id_str"),
        pytest.param(good_message(events=[{"id": True, "device": "s1", "frame": "{}"}]), id="event_id_bool"),
        pytest.param(good_message(events=[{"id": 1, "frame": "{}"}]), id="event_without_device"),
        pytest.param(good_message(events=[{"id": 1, "device": 5, "frame": "{}"}]), id="event_device_int"),
        pytest.param(good_message(events=[{"id": 1, "device": "s1"}]), id="event_without_frame"),
        pytest.param(good_message(events=[{"id": 1, "device": "s1", "frame": b"{}"}]), id="event_frame_bytes"),
    ],
)
def test_parse_events_message_rejects_malformed_messages(message):
    with pytest.raises(ValueError):
        parse_events_message(message)


class FlakyLayer(InMemoryChannelLayer):
    """Counts membership renewals; the first ``failures`` of them raise."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.renewed = 0

    async def group_add(self, group: str, channel: str) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("layer unavailable")
        self.renewed += 1
        await super().group_add(group, channel)


async def test_keep_membership_renews_every_interval_and_outlives_a_failed_renewal():
    layer = FlakyLayer(failures=1)
    renewal = asyncio.create_task(keep_membership(layer, "g", "c", interval=0.02))
    await asyncio.sleep(0.2)
    renewal.cancel()
    assert layer.failures == 0 and layer.renewed >= 3


@pytest.mark.redis
async def test_on_redis_a_member_that_stopped_renewing_leaves_the_group_and_a_renewed_one_stays():
    """What the gateway's group expiry is for: a web process that died without leaving (its hub's membership is no
    longer renewed) drops out of the group, so batches stop being queued for it, while live members stay."""
    url = require_redis()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    hosts = [{"address": url, "socket_timeout": None}]
    live_process, dead_process = (RedisChannelLayer(hosts=hosts, prefix=prefix, group_expiry=1) for _ in range(2))
    live, dead = await live_process.new_channel(), await dead_process.new_channel()
    await live_process.group_add("g", live)
    await dead_process.group_add("g", dead)
    renewal = asyncio.create_task(keep_membership(live_process, "g", live, interval=0.3))
    try:
        await asyncio.sleep(2.2)
        await live_process.group_send("g", {"type": "batch"})
        assert (await asyncio.wait_for(live_process.receive(live), 5))["type"] == "batch"
        members = redis.Redis.from_url(url).zrange(f"{prefix}:group:g", 0, -1)
        assert members == [live.encode()]
    finally:
        renewal.cancel()
        await live_process.flush()
