"""SocketFeed: a socket's bounded outbox, with gaps for what it could not hold and a hold for replays."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from devices.permissions import DeviceAccess
from gateway.events import WireEvent
from gateway.feed import Chunk, SocketFeed

EVERYTHING = DeviceAccess(everything=True)


def feed(max_events=100, frame_events=10, access=EVERYTHING):
    return SocketFeed(access=access, max_events=max_events, frame_events=frame_events)


def wired(event_id, device="s1") -> WireEvent:
    frame = orjson.dumps({"type": "status", "id": event_id, "device": device, "ts": 1.0, "online": True}).decode()
    return {"id": event_id, "device": device, "frame": frame}


async def take(socket_feed, timeout=1.0):
    """The next frames, decoded: a list of ``("events", [ids])`` and ``("gap", from, to)``."""
    frames = await asyncio.wait_for(socket_feed.next_frames(), timeout)
    return [describe(frame) for frame in frames]


def describe(text):
    frame = orjson.loads(text)
    if frame["type"] == "gap":
        return ("gap", frame["from"], frame["to"])
    if frame["type"] == "batch":
        return ("events", [event["id"] for event in frame["events"]])
    return ("events", [frame["id"]])


async def nothing_ready(socket_feed):
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(socket_feed.next_frames(), 0.02)
    return True


# --- what a feed wants --------------------------------------------------------------------------------------


def test_wants_subscribed_devices_only():
    socket_feed = feed()
    socket_feed.devices = {"s1"}
    assert socket_feed.wants("s1")
    assert not socket_feed.wants("s2")


def test_wildcard_wants_what_the_user_may_view():
    socket_feed = feed(access=DeviceAccess(everything=False, viewable=frozenset({"s1"})))
    socket_feed.wildcard = True
    assert socket_feed.wants("s1")
    assert not socket_feed.wants("s2")


# --- delivery -----------------------------------------------------------------------------------------------


async def test_a_single_event_is_a_single_frame():
    socket_feed = feed()
    socket_feed.push(wired(1))
    frames = await asyncio.wait_for(socket_feed.next_frames(), 1)
    assert frames == [wired(1)["frame"]]


async def test_events_are_batched_in_order():
    socket_feed = feed()
    for event_id in (1, 2, 3):
        socket_feed.push(wired(event_id))
    assert await take(socket_feed) == [("events", [1, 2, 3])]
    assert await nothing_ready(socket_feed)


async def test_batches_hold_at_most_frame_events_and_the_rest_follows():
    socket_feed = feed(frame_events=2)
    for event_id in range(1, 6):
        socket_feed.push(wired(event_id))
    assert await take(socket_feed) == [("events", [1, 2])]
    assert await take(socket_feed) == [("events", [3, 4])]
    assert await take(socket_feed) == [("events", [5])]
    assert await nothing_ready(socket_feed)


async def test_batches_stay_within_frame_chars_and_an_event_longer_than_that_goes_alone():
    """Daphne refuses to send a message over its size limit, and that error would end the socket's sender."""
    one = len(wired(1)["frame"])
    socket_feed = SocketFeed(access=EVERYTHING, max_events=100, frame_events=100, frame_chars=28 + 3 * (one + 1))
    for event_id in range(1, 8):
        socket_feed.push(wired(event_id))
    frames = await asyncio.wait_for(socket_feed.next_frames(), 1)
    assert [describe(frame) for frame in frames] == [("events", [1, 2, 3]), ("events", [4, 5, 6]), ("events", [7])]
    assert all(len(frame) <= 28 + 3 * (one + 1) for frame in frames)
    tiny = SocketFeed(access=EVERYTHING, max_events=100, frame_events=100, frame_chars=10)
    tiny.push(wired(1))
    tiny.push(wired(2))
    assert await take(tiny) == [("events", [1]), ("events", [2])]


async def test_batch_frames_are_valid_json_of_the_contract_shape():
    socket_feed = feed()
    socket_feed.push(wired(1, "a"))
    socket_feed.push(wired(2, "b"))
    (frame,) = await asyncio.wait_for(socket_feed.next_frames(), 1)
    assert orjson.loads(frame) == {
        "type": "batch",
        "events": [orjson.loads(wired(1, "a")["frame"]), orjson.loads(wired(2, "b")["frame"])],
    }


async def test_next_frames_waits_for_a_push():
    socket_feed = feed()
    waiter = asyncio.ensure_future(take(socket_feed))
    await asyncio.sleep(0)
    assert not waiter.done()
    socket_feed.push(wired(1))
    assert await waiter == [("events", [1])]


# --- bounded queue and gaps ---------------------------------------------------------------------------------


async def test_past_max_events_drops_become_one_gap_and_are_counted():
    socket_feed = feed(max_events=3, frame_events=10)
    for event_id in range(1, 8):
        socket_feed.push(wired(event_id))
    assert socket_feed.dropped == 4
    assert await take(socket_feed) == [("events", [1, 2, 3]), ("gap", 4, 7)]


async def test_a_gap_splits_batches():
    socket_feed = feed(max_events=2, frame_events=10)
    socket_feed.push(wired(1))
    socket_feed.push(wired(2))
    socket_feed.push(wired(3))  # dropped
    assert await take(socket_feed) == [("events", [1, 2]), ("gap", 3, 3)]
    socket_feed.push(wired(4))
    socket_feed.gap(5, 6)
    socket_feed.push(wired(7))
    assert await take(socket_feed) == [("events", [4]), ("gap", 5, 6), ("events", [7])]


async def test_room_frees_up_once_frames_are_taken():
    socket_feed = feed(max_events=2, frame_events=10)
    socket_feed.push(wired(1))
    socket_feed.push(wired(2))
    assert await take(socket_feed) == [("events", [1, 2])]
    socket_feed.push(wired(3))
    socket_feed.push(wired(4))
    assert socket_feed.dropped == 0
    assert await take(socket_feed) == [("events", [3, 4])]


async def test_external_gap_is_not_counted_as_dropped():
    socket_feed = feed()
    socket_feed.gap(10, 20)
    assert socket_feed.dropped == 0
    assert await take(socket_feed) == [("gap", 10, 20)]


async def test_adjacent_gaps_merge():
    socket_feed = feed(max_events=1)
    socket_feed.push(wired(1))
    socket_feed.push(wired(2))  # dropped
    socket_feed.gap(3, 5)
    socket_feed.push(wired(6))  # dropped
    assert await take(socket_feed) == [("events", [1]), ("gap", 2, 6)]


async def test_gaps_do_not_count_towards_frame_events():
    socket_feed = feed(frame_events=2)
    socket_feed.gap(1, 1)
    socket_feed.push(wired(2))
    socket_feed.push(wired(3))
    assert await take(socket_feed) == [("gap", 1, 1), ("events", [2, 3])]


# --- hold and release (replay) ------------------------------------------------------------------------------


async def test_a_held_feed_hands_out_nothing():
    socket_feed = feed()
    socket_feed.hold()
    socket_feed.push(wired(1))
    socket_feed.gap(2, 2)
    assert await nothing_ready(socket_feed)


async def test_release_puts_the_replay_first_and_drops_queued_duplicates():
    socket_feed = feed()
    socket_feed.hold()
    socket_feed.push(wired(5, "s1"))  # live, also in the replay
    socket_feed.push(wired(6, "s1"))  # live, after the replay's cutoff
    socket_feed.release(replay=[wired(3, "s1"), wired(4, "s1"), wired(5, "s1")], replayed_devices={"s1"}, cutoff=5)
    assert await take(socket_feed) == [("events", [3, 4, 5, 6])]


async def test_release_keeps_other_devices_events_at_or_below_the_cutoff():
    socket_feed = feed()
    socket_feed.hold()
    socket_feed.push(wired(4, "s2"))  # s2 was not replayed: keep it
    socket_feed.push(wired(5, "s1"))  # duplicate of the replay
    socket_feed.release(replay=[wired(5, "s1")], replayed_devices={"s1"}, cutoff=5)
    assert await take(socket_feed) == [("events", [5, 4])]


async def test_release_for_all_devices_drops_every_queued_event_up_to_the_cutoff():
    socket_feed = feed()
    socket_feed.hold()
    socket_feed.push(wired(4, "s2"))
    socket_feed.push(wired(5, "s1"))
    socket_feed.push(wired(7, "s3"))
    socket_feed.release(replay=[wired(4, "s2"), wired(5, "s1")], replayed_devices=None, cutoff=5)
    assert await take(socket_feed) == [("events", [4, 5, 7])]


async def test_release_with_a_gap_puts_the_gap_before_the_replay():
    socket_feed = feed()
    socket_feed.hold()
    socket_feed.release(replay=[wired(50)], gap=(11, 49), replayed_devices={"s1"}, cutoff=50)
    assert await take(socket_feed) == [("gap", 11, 49), ("events", [50])]


async def test_release_with_nothing_to_send_stays_quiet():
    socket_feed = feed()
    socket_feed.hold()
    socket_feed.release(replay=[], replayed_devices={"s1"}, cutoff=0)
    assert await nothing_ready(socket_feed)


async def test_queued_gaps_survive_a_release():
    socket_feed = feed(max_events=1)
    socket_feed.hold()
    socket_feed.push(wired(8, "s2"))
    socket_feed.push(wired(9, "s2"))  # dropped while held
    socket_feed.release(replay=[wired(3, "s1")], replayed_devices={"s1"}, cutoff=3)
    assert await take(socket_feed) == [("events", [3, 8]), ("gap", 9, 9)]


async def test_release_recounts_the_queue_against_max_events():
    socket_feed = feed(max_events=3)
    socket_feed.hold()
    socket_feed.push(wired(1))
    socket_feed.push(wired(2))
    socket_feed.push(wired(3))
    socket_feed.release(replay=[], replayed_devices={"s1"}, cutoff=3)  # all three were duplicates
    for event_id in (4, 5, 6):
        socket_feed.push(wired(event_id))
    assert socket_feed.dropped == 0
    assert await take(socket_feed) == [("events", [4, 5, 6])]


async def test_nested_holds_need_as_many_releases():
    socket_feed = feed()
    socket_feed.hold()
    socket_feed.hold()
    socket_feed.push(wired(1))
    socket_feed.release()
    assert await nothing_ready(socket_feed)
    socket_feed.release()
    assert await take(socket_feed) == [("events", [1])]


async def test_a_waiting_sender_wakes_up_on_release():
    socket_feed = feed()
    socket_feed.hold()
    waiter = asyncio.ensure_future(take(socket_feed))
    socket_feed.push(wired(2))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    socket_feed.release(replay=[wired(1)], replayed_devices={"s1"}, cutoff=1)
    assert await waiter == [("events", [1, 2])]


async def test_an_extra_release_is_harmless():
    socket_feed = feed()
    socket_feed.release()
    socket_feed.push(wired(1))
    assert await take(socket_feed) == [("events", [1])]


async def test_a_replay_larger_than_the_bound_does_not_crowd_out_live_events():
    socket_feed = feed(max_events=2, frame_events=100)
    socket_feed.hold()
    socket_feed.release(replay=[wired(event_id) for event_id in range(1, 6)], replayed_devices={"s1"}, cutoff=5)
    socket_feed.push(wired(6))
    socket_feed.push(wired(7))
    assert socket_feed.dropped == 0
    socket_feed.push(wired(8))  # the live bound still holds
    assert socket_feed.dropped == 1
    assert await take(socket_feed) == [("events", [1, 2, 3, 4, 5, 6, 7]), ("gap", 8, 8)]


async def test_an_event_announced_after_the_replay_that_contained_it_is_not_sent_twice():
    socket_feed = SocketFeed(access=DeviceAccess(everything=True), max_events=100, frame_events=100)
    socket_feed.devices = {"a", "b"}
    socket_feed.hold()
    socket_feed.release(replay=[wired(5, "a"), wired(6, "a")], replayed_devices={"a"}, cutoff=6)
    socket_feed.push(wired(6, "a"))  # committed before the query, announced only now
    socket_feed.push(wired(4, "b"))  # another device, not replayed: delivered
    socket_feed.push(wired(7, "a"))
    assert await take(socket_feed) == [("events", [5, 6, 4, 7])]


async def test_a_wildcard_replay_floors_every_device():
    socket_feed = SocketFeed(access=DeviceAccess(everything=True), max_events=100, frame_events=100)
    socket_feed.wildcard = True
    socket_feed.hold()
    socket_feed.release(replay=[wired(9, "a")], replayed_devices=None, cutoff=9)
    socket_feed.push(wired(8, "z"))
    socket_feed.push(wired(10, "z"))
    assert await take(socket_feed) == [("events", [9, 10])]


async def test_push_many_queues_a_batch_like_pushes_one_by_one():
    batched, single = feed(max_events=5), feed(max_events=5)
    events = [wired(n) for n in range(1, 8)]
    batched.push_many(Chunk(events[:3]))
    batched.push_many(Chunk(events[3:]))  # past the bound: the rest becomes a gap, counted, as push does
    for event in events:
        single.push(event)
    assert await take(batched) == await take(single) == [("events", [1, 2, 3, 4, 5]), ("gap", 6, 7)]
    assert batched.dropped == single.dropped == 2


async def test_push_many_skips_what_a_replay_already_sent():
    socket_feed = feed()
    socket_feed.hold()
    socket_feed.release(replay=[wired(1), wired(2)], replayed_devices=None, cutoff=2)
    socket_feed.push_many(Chunk([wired(2), wired(3)]))
    assert await take(socket_feed) == [("events", [1, 2, 3])]


async def test_a_chunk_is_one_frame_joined_once_for_every_socket_it_reaches():
    first, second = feed(frame_events=10), feed(frame_events=10)
    chunk = Chunk([wired(n) for n in range(1, 5)])
    first.push_many(chunk)
    second.push_many(chunk)
    (one,) = await asyncio.wait_for(first.next_frames(), 1)
    (other,) = await asyncio.wait_for(second.next_frames(), 1)
    assert one is other and describe(one) == ("events", [1, 2, 3, 4])


async def test_a_chunk_larger_than_a_frame_or_behind_other_events_is_sent_event_by_event():
    small = feed(frame_events=3)
    small.push_many(Chunk([wired(n) for n in range(1, 8)]))
    assert await take(small) == [("events", [1, 2, 3])]
    assert await take(small) == [("events", [4, 5, 6])]
    assert await take(small) == [("events", [7])]
    behind = feed(frame_events=10)
    behind.push(wired(1))
    behind.push_many(Chunk([wired(2), wired(3)]))
    behind.gap(4, 4)
    behind.push_many(Chunk([wired(5)]))
    assert await take(behind) == [("events", [1, 2, 3]), ("gap", 4, 4), ("events", [5])]


async def test_queued_chunks_are_filtered_by_forget_and_release_like_single_events():
    socket_feed = feed()
    socket_feed.push_many(Chunk([wired(1, "a"), wired(2, "b"), wired(3, "a")]))
    assert socket_feed.forget(lambda device: device == "a") == 1
    socket_feed.hold()
    socket_feed.push_many(Chunk([wired(4, "a")]))
    socket_feed.release(replay=[wired(3, "a")], replayed_devices={"a"}, cutoff=3)
    assert await take(socket_feed) == [("events", [3, 4])]
