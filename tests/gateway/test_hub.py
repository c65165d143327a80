"""Hub: fan-out of layer batches to local feeds, delivery in id order, catching up batches that came late or were
lost in the channel layer.

Driven directly (``Hub(layer=None)``, messages built by the bridge's own ``EventsPublisher``, committed events kept
by a ``FakeHistory``); the layer task is created by ``attach`` but never gets to run, and is cancelled at the end of
each test. ``tests/gateway/test_hub_order.py`` runs the catch-up against the database.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import REGISTRY

from devices.permissions import DeviceAccess
from devices.records import EventKind, EventRecord
from gateway.events import EventsPublisher, WireEvent, wire_event
from gateway.feed import SocketFeed
from gateway.hub import Hub, IdOrder

EVERYTHING = DeviceAccess(everything=True)


class FakeHistory:
    """Committed events: every record a test publishes (dispatched or lost) is committed."""

    def __init__(self) -> None:
        self.events: dict[int, WireEvent] = {}
        self.reads: list[tuple[int, int]] = []
        self.fail = False

    async def last_id(self) -> int:
        return max(self.events, default=0)

    async def between(self, after: int, before: int, limit: int) -> list[WireEvent]:
        self.reads.append((after, before))
        if self.fail:
            raise ConnectionError("database is away")
        found = [self.events[i] for i in sorted(self.events) if after < i < before]
        return found[-limit:]


HISTORY = FakeHistory()


@pytest.fixture
async def hub():
    global HISTORY
    HISTORY = FakeHistory()  # what batch() commits to, and what the hub reads back
    hub = Hub(layer=None, history=HISTORY)
    yield hub
    await hub.stop()


def record(event_id, device="s1"):
    return EventRecord(id=event_id, device_id=device, kind=EventKind.STATUS, ts=1.0, body={"online": True})


def batch(publisher, *events):
    """Commit these events and return the layer message announcing them."""
    records = [record(event_id, device) for event_id, device in events]
    for item in records:
        HISTORY.events[item.id] = wire_event(item)
    return dict(publisher.message(records))


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
    await hub.dispatch(batch(publisher, (1, "s1"), (2, "s2"), (3, "s1"), (4, "s3")))
    assert await drain(s1) == [("events", [1, 3])]
    assert await drain(s2) == [("events", [2])]


async def test_frames_are_the_publishers_text_unchanged(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    message = batch(publisher, (1, "s1"))
    await hub.dispatch(message)
    assert await asyncio.wait_for(socket_feed.next_frames(), 1) == [message["events"][0]["frame"]]


async def test_wildcard_feeds_get_only_devices_their_user_may_view(hub):
    publisher = EventsPublisher("bridge")
    limited = new_feed(hub, access=DeviceAccess(everything=False, viewable=frozenset({"s1", "s3"})))
    admin = new_feed(hub)
    nobody = new_feed(hub, access=DeviceAccess(everything=False))
    for socket_feed in (limited, admin, nobody):
        hub.subscribe(socket_feed, None)
    await hub.dispatch(batch(publisher, (1, "s1"), (2, "s2"), (3, "s3"), (4, "registered-later")))
    assert await drain(limited) == [("events", [1, 3])]
    assert await drain(admin) == [("events", [1, 2, 3, 4])]
    assert await drain(nobody) == []


async def test_a_feed_subscribed_by_device_and_wildcard_gets_each_event_once(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    hub.subscribe(socket_feed, None)
    await hub.dispatch(batch(publisher, (1, "s1"), (2, "s2")))
    assert await drain(socket_feed) == [("events", [1, 2])]


async def test_a_feed_subscribed_by_device_and_wildcard_gets_events_in_id_order(hub):
    publisher = EventsPublisher("bridge")
    mixed, wildcard = new_feed(hub), new_feed(hub)
    hub.subscribe(mixed, {"s2"})
    hub.subscribe(mixed, None)
    hub.subscribe(wildcard, None)
    await hub.dispatch(batch(publisher, (1, "s1"), (2, "s2"), (3, "s1"), (4, "s2")))
    assert await drain(mixed) == [("events", [1, 2, 3, 4])]
    assert await drain(wildcard) == [("events", [1, 2, 3, 4])]


async def test_another_wildcard_feed_still_gets_a_device_someone_subscribed_to(hub):
    publisher = EventsPublisher("bridge")
    by_device, wildcard = new_feed(hub), new_feed(hub)
    hub.subscribe(by_device, {"s1"})
    hub.subscribe(wildcard, None)
    await hub.dispatch(batch(publisher, (1, "s1")))
    assert await drain(by_device) == [("events", [1])]
    assert await drain(wildcard) == [("events", [1])]


async def test_unsubscribe_devices(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1", "s2"})
    hub.unsubscribe(socket_feed, {"s1", "never-subscribed"})
    assert socket_feed.devices == {"s2"}
    await hub.dispatch(batch(publisher, (1, "s1"), (2, "s2")))
    assert await drain(socket_feed) == [("events", [2])]


async def test_unsubscribe_star_stops_everything_but_keeps_the_socket(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    hub.subscribe(socket_feed, None)
    hub.unsubscribe(socket_feed, None)
    assert (socket_feed.wildcard, socket_feed.devices, hub.sockets) == (False, set(), 1)
    await hub.dispatch(batch(publisher, (1, "s1"), (2, "s2")))
    assert await drain(socket_feed) == []
    hub.subscribe(socket_feed, {"s2"})
    await hub.dispatch(batch(publisher, (3, "s2")))
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
    await hub.dispatch(batch(publisher, (1, "s1")))
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
        {"type": "gateway.events", "source": "b", "seq": 1, "events": "nope"},
        {"type": "gateway.events", "source": "b", "seq": 1, "events": [{"id": 1}]},
        {"type": "gateway.events", "source": "b", "seq": 1, "events": [None]},
    ],
)
async def test_malformed_messages_are_counted_and_ignored(hub, message):
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    before = sample("gateway_hub_invalid_messages_total")
    await hub.dispatch(message)
    assert sample("gateway_hub_invalid_messages_total") == before + 1
    assert await drain(socket_feed) == []


# --- id order, losses and catch-up -------------------------------------------------------------------------


async def test_consecutive_batches_are_not_a_loss_and_read_nothing(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    before = sample("gateway_hub_lost_batches_total")
    for event_id in (1, 2, 3):
        await hub.dispatch(batch(publisher, (event_id, "s1")))
    await hub.dispatch(batch(publisher))  # an empty batch is still numbered
    await hub.dispatch(batch(publisher, (4, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [1, 2, 3, 4])]
    assert HISTORY.reads == []


async def test_lost_batches_are_counted_and_their_events_caught_up_in_id_order(hub):
    publisher = EventsPublisher("bridge")
    subscribed, wildcard, idle = new_feed(hub), new_feed(hub), new_feed(hub)
    hub.subscribe(subscribed, {"s1"})
    hub.subscribe(wildcard, None)
    await hub.dispatch(batch(publisher, (1, "s1"), (2, "s2")))
    batch(publisher, (3, "s1"), (4, "s9"))  # lost in the layer
    batch(publisher, (5, "s2"))  # lost too
    lost, caught_up = sample("gateway_hub_lost_batches_total"), sample("gateway_hub_caught_up_events_total")
    await hub.dispatch(batch(publisher, (6, "s1")))
    assert sample("gateway_hub_lost_batches_total") == lost + 2
    assert sample("gateway_hub_caught_up_events_total") == caught_up + 3
    assert await drain(subscribed) == [("events", [1, 3, 6])]
    assert await drain(wildcard) == [("events", [1, 2, 3, 4, 5, 6])]
    assert await drain(idle) == []


async def test_a_batch_that_overtook_another_writer_is_delivered_after_the_missing_ids(hub):
    first_bridge, second_bridge = EventsPublisher("bridge-a"), EventsPublisher("bridge-b")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    await hub.dispatch(batch(first_bridge, (1, "s1")))
    late = batch(first_bridge, (2, "s1"), (3, "s2"))  # committed first, announced last
    await hub.dispatch(batch(second_bridge, (4, "s1")))
    await hub.dispatch(late)  # its ids were caught up: dropped, not delivered twice
    await hub.dispatch(batch(second_bridge, (5, "s2")))
    assert await drain(socket_feed) == [("events", [1, 2, 3, 4, 5])]
    assert HISTORY.reads == [(1, 4)]


async def test_rolled_back_ids_read_as_nothing(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    await hub.dispatch(batch(publisher, (1, "s1")))
    await hub.dispatch(batch(publisher, (4, "s1")))  # 2 and 3 were never committed
    await hub.dispatch(batch(publisher, (5, "s1")))
    assert await drain(socket_feed) == [("events", [1, 4, 5])]
    assert HISTORY.reads == [(1, 4)]


async def test_when_the_database_cannot_be_read_the_missing_ids_are_a_gap(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    await hub.dispatch(batch(publisher, (1, "s1")))
    batch(publisher, (2, "s1"))  # lost
    HISTORY.fail = True
    failures = sample("gateway_hub_catch_up_failures_total")
    await hub.dispatch(batch(publisher, (3, "s1")))
    assert sample("gateway_hub_catch_up_failures_total") == failures + 1
    assert await drain(socket_feed) == [("events", [1]), ("gap", 2, 2), ("events", [3])]


async def test_a_catch_up_reads_at_most_fill_max_events_and_reports_the_rest_as_a_gap():
    history = FakeHistory()
    for event_id in range(1, 12):
        history.events[event_id] = wire_event(record(event_id))
    order = IdOrder(history, fill_max=3)
    await order.start()
    assert order.delivered == 11
    history.events[12] = wire_event(record(12))
    delivered, gap = await order.admit([history.events[12]])
    assert ([e["id"] for e in delivered], gap) == ([12], None)
    for event_id in range(13, 20):
        history.events[event_id] = wire_event(record(event_id))
    delivered, gap = await order.admit([history.events[19]])
    assert [e["id"] for e in delivered] == [16, 17, 18, 19]
    assert gap == (13, 15)


async def test_losing_only_empty_batches_counts_but_delivers_everything(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    await hub.dispatch(batch(publisher, (1, "s1")))
    publisher.message([])  # lost, but held no events
    before = sample("gateway_hub_lost_batches_total")
    await hub.dispatch(batch(publisher, (2, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before + 1
    assert await drain(socket_feed) == [("events", [1, 2])]


async def test_sources_are_tracked_independently(hub):
    a, b = EventsPublisher("bridge-a"), EventsPublisher("bridge-b")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    before = sample("gateway_hub_lost_batches_total")
    await hub.dispatch(batch(a, (1, "s1")))
    await hub.dispatch(batch(b, (2, "s2")))
    await hub.dispatch(batch(a, (3, "s1")))
    await hub.dispatch(batch(b, (4, "s2")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [1, 2, 3, 4])]


async def test_the_first_batch_seen_from_a_source_is_not_a_loss(hub):
    publisher = EventsPublisher("bridge")
    publisher.message([record(1)])  # sent before this hub joined the group
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    before = sample("gateway_hub_lost_batches_total")
    await hub.dispatch(batch(publisher, (2, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [2])]


async def test_a_restarted_source_starting_over_is_not_a_loss(hub):
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, None)
    old = EventsPublisher("bridge")
    for event_id in (1, 2, 3):
        await hub.dispatch(batch(old, (event_id, "s1")))
    before = sample("gateway_hub_lost_batches_total")
    restarted = EventsPublisher("bridge")
    await hub.dispatch(batch(restarted, (4, "s1")))
    await hub.dispatch(batch(restarted, (5, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [1, 2, 3, 4, 5])]


async def test_a_gap_reaches_a_sender_waiting_on_the_feed(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    await hub.dispatch(batch(publisher, (1, "s1")))
    assert [frame["id"] for frame in await next_items(socket_feed)] == [1]
    batch(publisher, (2, "s1"))  # lost, and the database is away
    HISTORY.fail = True
    await hub.dispatch(batch(publisher, (3, "s2")))
    assert await next_items(socket_feed) == [{"type": "gap", "from": 2, "to": 2}]


async def test_a_batch_reordered_in_transit_is_neither_a_loss_nor_delivered_twice(hub):
    publisher = EventsPublisher("bridge")
    socket_feed = new_feed(hub)
    hub.subscribe(socket_feed, {"s1"})
    await hub.dispatch(batch(publisher, (1, "s1")))
    second = batch(publisher, (2, "s1"))
    third = batch(publisher, (3, "s1"))
    await hub.dispatch(third)  # overtook the second: counted as a loss, its event caught up
    before = sample("gateway_hub_lost_batches_total")
    await hub.dispatch(second)  # arrives late: not counted again, nothing delivered twice
    await hub.dispatch(batch(publisher, (4, "s1")))
    assert sample("gateway_hub_lost_batches_total") == before
    assert await drain(socket_feed) == [("events", [1, 2, 3, 4])]
