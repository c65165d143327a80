"""A socket's bounded outbox of ready-made event frames, with replay hold and gap tracking."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from devices.permissions import DeviceAccess
from gateway import metrics
from gateway.events import WireEvent, batch_frame, gap_frame

BATCH_OVERHEAD = len(batch_frame(["", ""])) - 1  # the batch wrapper, without the events and their commas


@dataclass(slots=True)
class Gap:
    first: int
    last: int


class Chunk:
    """A batch of events pushed to several sockets at once (the hub's dispatch to sockets of every device): its
    batch frame is joined once, by the first socket that sends it whole, and reused by the others. A socket that is
    keeping up sends each chunk whole; one that is behind merges what it has queued into fuller frames instead."""

    __slots__ = ("_frame", "chars", "events")

    def __init__(self, events: list[WireEvent]) -> None:
        self.events = events
        self.chars = BATCH_OVERHEAD + sum(len(event["frame"]) + 1 for event in events)
        self._frame: str | None = None

    def frame(self) -> str:
        if self._frame is None:
            self._frame = batch_frame([event["frame"] for event in self.events])
        return self._frame


class SocketFeed:
    """What the hub pushes to one socket; the socket's sender task takes frames from it.

    Bounded by ``max_events``: past it, events are dropped and a ``gap`` frame takes their place, so the
    client knows to resume. While ``held`` (during a replay) events are queued but not handed out. A batch frame
    holds at most ``frame_events`` events and ``frame_chars`` characters (unless one event alone is longer): Daphne
    refuses to send a message over its size limit (4 x GATEWAY_WS_MAX_FRAME bytes in the deployed units), and
    that error would end the socket's sender.
    """

    def __init__(self, *, access: DeviceAccess, max_events: int, frame_events: int, frame_chars: int = 131072) -> None:
        self.access = access
        self.devices: set[str] = set()
        self.wildcard = False
        self._max = max_events
        self._frame_events = frame_events
        self._frame_chars = frame_chars
        self._items: deque[WireEvent | Gap | Chunk] = deque()
        self._events = 0
        self._replay_left = 0  # replayed events still queued: they do not count against the live bound
        # After a replay, ids at or below its cutoff were replayed (or reported as a gap): a late announcement of
        # one of them must not be sent again. Per replayed device, or for all devices after a wildcard replay.
        self._floor_all = 0
        self._floors: dict[str, int] = {}
        self._held = 0
        self._ready = asyncio.Event()
        self.dropped = 0

    def wants(self, device_id: str) -> bool:
        if self.wildcard:
            return self.access.can_view(device_id)
        return device_id in self.devices

    def push(self, event: WireEvent) -> None:
        if event["id"] <= self._floor_all or event["id"] <= self._floors.get(event["device"], 0):
            return  # already replayed: announced after the replay's query, but committed before it
        if self._events - self._replay_left >= self._max:
            self._drop(event["id"], event["id"], "queue_full")
            return
        self._items.append(event)
        self._events += 1
        if not self._held:
            self._ready.set()

    def push_many(self, chunk: Chunk) -> None:
        """``push`` each event of ``chunk`` (in id order): queued whole when nothing stands in the way (no replay
        floor, room for all of it), and then sent as one frame that other sockets share."""
        events = chunk.events
        if not events:
            return
        if self._floor_all == 0 and not self._floors and self._events - self._replay_left + len(events) <= self._max:
            self._items.append(chunk)
            self._events += len(events)
            if not self._held:
                self._ready.set()
            return
        for event in events:
            self.push(event)

    def _spread(self) -> list[WireEvent | Gap]:
        """The queue, chunks spread into their events (to filter or re-order it)."""
        spread: list[WireEvent | Gap] = []
        for item in self._items:
            if isinstance(item, Chunk):
                spread.extend(item.events)
            else:
                spread.append(item)
        return spread

    def gap(self, first: int, last: int) -> None:
        """Mark ids ``first..last`` as missed (for example lost in the channel layer)."""
        self._add_gap(first, last)

    def _drop(self, first: int, last: int, reason: str) -> None:
        metrics.WS_DROPPED.labels(reason).inc()
        self.dropped += 1
        self._add_gap(first, last)

    def _add_gap(self, first: int, last: int) -> None:
        tail = self._items[-1] if self._items else None
        if isinstance(tail, Gap):
            tail.first, tail.last = min(tail.first, first), max(tail.last, last)
        else:
            self._items.append(Gap(first, last))
        if not self._held:
            self._ready.set()

    def forget(self, keep: Callable[[str], bool]) -> int:
        """Drop queued events whose device ``keep`` refuses (access was withdrawn); returns how many."""
        before = self._events
        self._items = deque(item for item in self._spread() if isinstance(item, Gap) or keep(item["device"]))
        self._events = sum(1 for item in self._items if not isinstance(item, Gap))
        self._replay_left = min(self._replay_left, self._events)
        return before - self._events

    def hold(self) -> None:
        self._held += 1

    def release(
        self,
        *,
        replay: Iterable[WireEvent] = (),
        gap: tuple[int, int] | None = None,
        replayed_devices: Collection[str] | None = None,
        cutoff: int = 0,
    ) -> None:
        """Put a replay in front of what was queued meanwhile, dropping queued duplicates.

        A queued event of ``replayed_devices`` (all devices when ``None``) with an id at or below ``cutoff``
        is already in the replay (ids become visible in order), so it goes; and so does one pushed later (an event
        committed before the replay's query can be announced after this release).
        """
        head: list[WireEvent | Gap | Chunk] = [Gap(*gap)] if gap else []
        head.extend(replay)
        self._replay_left += len(head) - (1 if gap else 0)
        kept: list[WireEvent | Gap | Chunk] = [
            item
            for item in self._spread()
            if isinstance(item, Gap)
            or item["id"] > cutoff
            or (replayed_devices is not None and item["device"] not in replayed_devices)
        ]
        self._items = deque(head + kept)
        if replayed_devices is None:
            self._floor_all = max(self._floor_all, cutoff)
        else:
            for device in replayed_devices:
                self._floors[device] = max(self._floors.get(device, 0), cutoff)
        self._events = sum(1 for item in self._items if not isinstance(item, Gap))
        self._held = max(0, self._held - 1)
        if self._items and not self._held:
            self._ready.set()

    async def next_frames(self) -> list[str]:
        """Wait for something to send; return it as frames (events batched, gaps on their own)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._held or not self._items:
                continue
            return self._take()

    def _take(self) -> list[str]:
        frames: list[str] = []
        batch: list[str] = []
        size = BATCH_OVERHEAD
        taken = 0
        while self._items and taken < self._frame_events:
            item = self._items.popleft()
            if isinstance(item, Chunk):
                count = len(item.events)
                alone = not batch and (not self._items or isinstance(self._items[0], Gap))
                if alone and taken + count <= self._frame_events and item.chars <= self._frame_chars:
                    frames.append(item.frame())  # whole: the frame other sockets send too
                    self._events -= count
                    self._replay_left = max(0, self._replay_left - count)
                    taken += count
                    continue
                # Behind other events, or too big for one frame: event by event (fewer frames for a lagging socket).
                self._items.extendleft(reversed(item.events))
                continue
            full = not isinstance(item, Gap) and size + len(item["frame"]) + 1 > self._frame_chars
            if batch and (isinstance(item, Gap) or full):
                frames.append(batch_frame(batch))
                batch, size = [], BATCH_OVERHEAD
            if isinstance(item, Gap):
                frames.append(gap_frame(item.first, item.last))
                continue
            batch.append(item["frame"])
            size += len(item["frame"]) + 1
            self._events -= 1
            self._replay_left = max(0, self._replay_left - 1)
            taken += 1
        if batch:
            frames.append(batch_frame(batch))
        metrics.WS_EVENTS.inc(taken)
        if self._items:
            self._ready.set()
        return frames
