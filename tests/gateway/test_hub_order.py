"""The hub's catch-up against the real database: a batch that overtook another writer's is delivered after the
overtaken ids, read from the database, and the late batch is not delivered again."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from asgiref.sync import sync_to_async

from devices import services
from devices.permissions import DeviceAccess
from devices.records import EventKind, Observation
from gateway.events import EventsPublisher
from gateway.feed import SocketFeed
from gateway.hub import Hub

pytestmark = [pytest.mark.django_db(transaction=True)]


@sync_to_async
def store(device_id: str, *values: float):
    observations = [
        Observation(device_id=device_id, kind=EventKind.TELEMETRY, received_at=time.time(), body={"values": {"v": v}})
        for v in values
    ]
    return services.ingest(observations=observations, auto_register=True, max_devices=100).stored


async def received(feed: SocketFeed) -> list[int]:
    ids: list[int] = []
    while True:
        try:
            frames = await asyncio.wait_for(feed.next_frames(), 0.05)
        except TimeoutError:
            return ids
        for text in frames:
            frame = orjson.loads(text)
            ids.extend(event["id"] for event in frame["events"]) if frame["type"] == "batch" else ids.append(
                frame["id"]
            )


async def test_an_overtaking_batch_waits_for_the_committed_ids_it_overtook():
    await store("before", 1.0)  # committed before the hub joined: not this hub's to deliver
    hub = Hub(layer=None)
    await hub._order.start()
    feed = SocketFeed(access=DeviceAccess(everything=True), max_events=100, frame_events=100)
    hub.attach(feed)
    hub.subscribe(feed, None)
    try:
        first, second = EventsPublisher("bridge-a"), EventsPublisher("bridge-b")
        committed_first = await store("a", 1.0, 2.0, 3.0)
        committed_second = await store("b", 4.0, 5.0)
        await hub.dispatch(dict(second.message(committed_second)))  # announced first
        await hub.dispatch(dict(first.message(committed_first)))  # late: already caught up
        expected = [record.id for record in committed_first + committed_second]
        assert await received(feed) == expected
    finally:
        await hub.stop()
