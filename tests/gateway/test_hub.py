"""Hub: fan-out of layer batches to local feeds, and detection of batches lost in the channel layer.

Driven directly (``Hub(layer=None)``, messages built by the bridge's own ``EventsPublisher``); the layer task is
created by ``attach`` but never gets to run, and is cancelled at the end of each test.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import REGISTRY

from devices.permissions import DeviceAccess
from devices.records import EventKind, EventRecord
from gateway.events import EventsPublisher
from gateway.feed import SocketFeed
from gateway.hub import Hub

EVERYTHING = DeviceAccess(everything=True)


@pytest.fixture
async def hub():
    hub = Hub(layer=None)
    yield hub
    await hub.stop()


def record(event_id, device="s1"):
    return EventRecord(id=event_id, device_id=device, kind=EventKind.STATUS, ts=1.0, body={"online": True})


def batch(publisher, *events):
    return dict(publisher.message([record(event_id, device) for event_id, device in events]))


def new_feed(hub, access=EVERYTHING, max_events=100):
    socket_feed = SocketFeed(access=access, max_events=max_events, frame_events=100)
    hub.attach(socket_feed)
    return socket_feed


async def drain(socket_feed):
    """Everything the feed hands out now, as ``("events", [ids])`` / ``("gap", from, to)`` items."""
    out: list[tuple[object, ...]] = []
    while True:
        try:
            frames = await asyncio.wait_for(socket_feed.next_frames(), 0.01)
        except TimeoutError:
            return out
        for text in frames:
            frame = orjson.loads(text)
            if frame["type"] == "gap":
                out.append(("gap", frame["from"], frame["to"]))
            elif frame["type"] == "batch":
                out.append(("events", [event["id"] for event in frame["events"]]))
            else:
                out.append(("events", [frame["id"]]))


async def next_items(socket_feed):
    frames = await asyncio.wait_for(socket_feed.next_frames(), 1)
    return [orjson.loads(text) for text in frames]


def sample(name, labels=None):
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# --- fan-out ------------------------------------------------------------------------------------------------


async def test_events_go_to_feeds_subscribed_to_their_device(hub):
    publisher = EventsPublisher("bridge")
    s1, s2 = new_feed(hub), new_feed(hub)
    hub.subscribe(s1, {"s1"})
    hub.subscribe(s2, {"s2"})
    hub.dispatch(batch(publisher, (1, "s1"), (2, "s2"), (3, "s1"), (4, "s3")))
    assert await drain(s1) == [("events", [1, 3])]
    assert await drain(s2) == [("events", [2])]


async def test_frames_are_the_publishers_text_unchanged(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    message = batch(publisher, (1, "s1"))
    hub.dispatch(message)
    assert await asyncio.wait_for(socket_feed.next_frames(), 1) == [message["events"][0]["frame"]]


async def test_wildcard_feeds_get_only_devices_their_user_may_view(hub):
    publisher = EventsPublisher("bridge")
    limited = new_feed(hub, access=DeviceAccess(everything=False, viewable=frozenset({"s1", "s3"})))
    admin = new_feed(hub)
    nobody = new_feed(hub, access=DeviceAccess(everything=False))
    for socket_feed in (limited, admin, nobody):
        hub.subscribe(socket_feed, None)
    hub.dispatch(batch(publisher, (1, "s1"), (2, "s2"), (3, "s3"), (4, "registered-later")))
    assert await drain(limited) == [("events", [1, 3])]
    assert await drain(admin) == [("events", [1, 2, 3, 4])]
    assert await drain(nobody) == []


async def test_a_feed_subscribed_by_device_and_wildcard_gets_each_event_once(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    hub.subscribe(socket_feed, None)
    hub.dispatch(batch(publisher, (1, "s1"), (2, "s2")))
    assert await drain(socket_feed) == [("events", [1, 2])]


async def test_another_wildcard_feed_still_gets_a_device_someone_subscribed_to(hub):
    publisher = EventsPublisher("bridge")
    by_device, wildcard = new_feed(hub), new_feed(hub)
    hub.subscribe(by_device, {"s1"})
    hub.subscribe(wildcard, None)
    hub.dispatch(batch(publisher, (1, "s1")))
    assert await drain(by_device) == [("events", [1])]
    assert await drain(wildcard) == [("events", [1])]


async def test_unsubscribe_devices(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1", "s2"})
    hub.unsubscribe(socket_feed, {"s1", "never-subscribed"})
    assert socket_feed.devices == {"s2"}
    hub.dispatch(batch(publisher, (1, "s1"), (2, "s2")))
    assert await drain(socket_feed) == [("events", [2])]


async def test_unsubscribe_star_stops_everything_but_keeps_the_socket(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    hub.subscribe(socket_feed, None)
    hub.unsubscribe(socket_feed, None)
    assert (socket_feed.wildcard, socket_feed.devices, hub.sockets) == (False, set(), 1)
    hub.dispatch(batch(publisher, (1, "s1"), (2, "s2")))
    assert await drain(socket_feed) == []
    hub.subscribe(socket_feed, {"s2"})
    hub.dispatch(batch(publisher, (3, "s2")))
    assert await drain(socket_feed) == [("events", [3])]


async def test_detach_removes_the_feed_everywhere(hub):
    publisher = EventsPublisher("bridge")
    gone, stays = new_feed(hub), new_feed(hub)
    for socket_feed in (gone, stays):
        hub.subscribe(socket_feed, {"s1"})
        hub.subscribe(socket_feed, None)
    hub.detach(gone)
    assert hub.sockets == 1
    assert (gone.wildcard, gone.devices) == (False, set())
    hub.dispatch(batch(publisher, (1, "s1")))
    assert await drain(gone) == []
    assert await drain(stays) == [("events", [1])]


async def test_detach_is_idempotent(hub):
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    hub.detach(socket_feed)
    hub.detach(socket_feed)
    assert hub.sockets == 0


# --- malformed messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"type": "gateway.other"},
        {"type": "gateway.events", "source": "b", "seq": 1, "prev_id": 0, "events": "nope"},
        {"type": "gateway.events", "source": "b", "seq": 1, "prev_id": 0, "events": [{"id": 1}]},
        {"type": "gateway.events", "source": "b", "seq": 1, "prev_id": 0, "events": [None]},
    ],
)
async def test_malformed_messages_are_counted_and_ignored(hub, message):
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    before = sample("gateway_hub_invalid_messages_total")
    hub.dispatch(message)
    assert sample("gateway_hub_invalid_messages_total") == before + 1
    assert await drain(socket_feed) == []


# --- loss detection -----------------------------------------------------------------------------------------


async def test_consecutive_batches_are_not_a_loss(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    before = sample("gateway_hub_lost_batches_total")
    for event_id in (1, 2, 3):
        hub.dispatch(batch(publisher, (event_id, "s1")))
    hub.dispatch(batch(publisher))  # an empty batch is still numbered
    hub.dispatch(batch(publisher, (4, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [1, 2, 3, 4])]


async def test_a_skipped_seq_is_a_gap_on_every_feed_and_counted(hub):
    publisher = EventsPublisher("bridge")
    subscribed, wildcard, idle = new_feed(hub), new_feed(hub), new_feed(hub)
    hub.subscribe(subscribed, {"s1"})
    hub.subscribe(wildcard, None)
    hub.dispatch(batch(publisher, (1, "s1"), (2, "s2")))
    publisher.message([record(3, "s1"), record(4, "s9")])  # lost in the layer
    publisher.message([record(5, "s2")])  # lost too
    before = sample("gateway_hub_lost_batches_total")
    hub.dispatch(batch(publisher, (6, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before + 2
    assert await drain(subscribed) == [("events", [1]), ("gap", 3, 5), ("events", [6])]
    assert await drain(wildcard) == [("events", [1, 2]), ("gap", 3, 5), ("events", [6])]
    assert await drain(idle) == [("gap", 3, 5)]


async def test_losing_only_empty_batches_counts_but_makes_no_gap(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    hub.dispatch(batch(publisher, (1, "s1")))
    publisher.message([])  # lost, but held no events
    before = sample("gateway_hub_lost_batches_total")
    hub.dispatch(batch(publisher, (2, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before + 1
    assert await drain(socket_feed) == [("events", [1, 2])]


async def test_sources_are_tracked_independently(hub):
    a, b = EventsPublisher("bridge-a"), EventsPublisher("bridge-b")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    before = sample("gateway_hub_lost_batches_total")
    hub.dispatch(batch(a, (1, "s1")))
    hub.dispatch(batch(b, (2, "s2")))
    hub.dispatch(batch(a, (3, "s1")))
    hub.dispatch(batch(b, (4, "s2")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [1, 2, 3, 4])]


async def test_the_first_batch_seen_from_a_source_is_not_a_loss(hub):
    publisher = EventsPublisher("bridge")
    publisher.message([record(1)])  # sent before this hub joined the group
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    before = sample("gateway_hub_lost_batches_total")
    hub.dispatch(batch(publisher, (2, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [2])]


async def test_a_restarted_source_starting_over_is_not_a_loss(hub):
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    old = EventsPublisher("bridge")
    for event_id in (1, 2, 3):
        hub.dispatch(batch(old, (event_id, "s1")))
    before = sample("gateway_hub_lost_batches_total")
    restarted = EventsPublisher("bridge")
    hub.dispatch(batch(restarted, (4, "s1")))
    hub.dispatch(batch(restarted, (5, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [1, 2, 3, 4, 5])]


async def test_a_gap_reaches_a_sender_waiting_on_the_feed(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    hub.dispatch(batch(publisher, (1, "s1")))
    assert [frame["id"] for frame in await next_items(socket_feed)] == [1]
    publisher.message([record(2, "s2")])
    hub.dispatch(batch(publisher, (3, "s2")))
    assert await next_items(socket_feed) == [{"type": "gap", "from": 2, "to": 2}]


async def test_a_batch_reordered_in_transit_is_delivered_without_a_gap_or_a_rewind(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    hub.dispatch(batch(publisher, (1, "s1")))
    second = batch(publisher, (2, "s1"))
    third = batch(publisher, (3, "s1"))
    hub.dispatch(third)  # overtook the second: a loss, as far as the hub can tell
    before = sample("gateway_hub_lost_batches_total")
    hub.dispatch(second)  # arrives late: delivered, not counted again, sequence not rewound
    hub.dispatch(batch(publisher, (4, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [1]), ("gap", 2, 2), ("events", [3, 2, 4])]
