"""One channel-layer subscriber per web process, fanning event batches out to that process's sockets.

Layer operations therefore grow with batches and processes, never with messages or sockets: the bridge sends one
``gateway.events`` message per stored batch; each process's ``Hub`` receives it once and pushes each event's
ready-made frame into the feeds of the local sockets that want it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any, Protocol

from devices import selectors
from gateway import metrics
from gateway.db import db_call
from gateway.events import (
    EVENTS_GROUP,
    GROUP_REFRESH,
    EventsMessage,
    WireEvent,
    keep_membership,
    parse_events_message,
    wire_event,
)
from gateway.feed import Chunk, SocketFeed

logger = logging.getLogger(__name__)

FILL_MAX = 5000  # most events one catch-up reads from the database; older missing ones become a gap
RETRY_CAP = 2.0  # longest wait between attempts to rejoin a lost layer: browsers get events again within ~2 s of it
_MAX_SOURCES = 1000


class History(Protocol):
    """What a hub reads of committed events (the database; a fake in unit tests)."""

    async def last_id(self) -> int: ...

    async def between(self, after: int, before: int, limit: int) -> list[WireEvent]:
        """The newest ``limit`` events with ``after < id < before``, in id order."""
        ...


class StoredHistory:
    """The database, through ``devices.selectors``."""

    async def last_id(self) -> int:
        return await db_call(selectors.last_event_id)()

    async def between(self, after: int, before: int, limit: int) -> list[WireEvent]:
        records = await db_call(selectors.events_between)(after=after, before=before, limit=limit)
        return [wire_event(record) for record in records]


class IdOrder:
    """Keeps what one process delivers in strictly increasing id order, whichever writer's batch comes first.

    Every event reaches every hub, but each writer (several bridges; the web side's command events) announces its
    own batches after its own commit, so one batch can overtake another. Ids become visible in id order
    (contract section 4), so when a batch starts beyond the last id delivered + 1, everything between is already
    committed: it is read from the database and delivered first, and the overtaken batch, when it comes, finds
    its ids delivered and is dropped. The same catch-up recovers batches lost in the layer. Rolled-back or deleted
    ids simply read as nothing.
    """

    def __init__(self, history: History, *, fill_max: int = FILL_MAX) -> None:
        self._history = history
        self._fill_max = fill_max
        self.delivered: int | None = None

    async def start(self) -> None:
        """Deliver what is committed from now on (called when the hub has joined the group, before it is ready).
        Kept across rejoins: what was missed meanwhile is caught up (up to ``fill_max``) instead of lost."""
        if self.delivered is None:
            self.delivered = await self._history.last_id()

    async def admit(self, events: list[WireEvent]) -> tuple[list[WireEvent], tuple[int, int] | None]:
        """The events to deliver now, in id order, and an id range that could not be caught up (or None)."""
        if not events:
            return [], None
        # Not started (driven directly, in tests): begin with this batch.
        delivered = events[0]["id"] - 1 if self.delivered is None else self.delivered
        if events[0]["id"] <= delivered:
            events = [event for event in events if event["id"] > delivered]  # already delivered by a catch-up
            if not events:
                return [], None
        gap: tuple[int, int] | None = None
        first = events[0]["id"]
        if first > delivered + 1:
            try:
                missing = await self._history.between(delivered, first, self._fill_max + 1)
            except Exception as exc:  # the database is away: say what is missing, clients reload it later
                metrics.HUB_CATCH_UP_FAILURES.inc()
                logger.warning("could not read ids %d-%d to keep id order: %s", delivered + 1, first - 1, exc)
                missing, gap = [], (delivered + 1, first - 1)
            if len(missing) > self._fill_max:
                missing = missing[-self._fill_max :]
                gap = (delivered + 1, missing[0]["id"] - 1)
            metrics.HUB_CAUGHT_UP.inc(len(missing))
            events = missing + events
        self.delivered = events[-1]["id"]
        return events, gap


class Hub:
    _instances: dict[tuple[int, int], Hub] = {}

    def __init__(self, layer: Any, *, history: History | None = None) -> None:
        self._layer = layer
        self._order = IdOrder(history or StoredHistory())
        self._all: set[SocketFeed] = set()
        self._wildcard: set[SocketFeed] = set()
        self._by_device: dict[str, set[SocketFeed]] = {}
        self._sources: OrderedDict[str, int] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.channel_name: str | None = None
        self.ready = asyncio.Event()

    @classmethod
    def for_layer(cls, layer: Any) -> Hub:
        """The hub of this process for ``layer`` on the running event loop (created on first use)."""
        key = (id(asyncio.get_running_loop()), id(layer))
        hub = cls._instances.get(key)
        if hub is None:
            hub = cls._instances[key] = cls(layer)
        return hub

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- socket bookkeeping -------------------------------------------------------------------------------

    def attach(self, feed: SocketFeed) -> None:
        self._all.add(feed)
        self.start()

    def detach(self, feed: SocketFeed) -> None:
        self._all.discard(feed)
        self._wildcard.discard(feed)
        for device_id in feed.devices:
            members = self._by_device.get(device_id)
            if members is not None:
                members.discard(feed)
                if not members:
                    del self._by_device[device_id]
        feed.devices.clear()
        feed.wildcard = False

    def subscribe(self, feed: SocketFeed, devices: set[str] | None) -> None:
        """Add devices to ``feed`` (``None``: every device it may view, now and later)."""
        if devices is None:
            feed.wildcard = True
            self._wildcard.add(feed)
            return
        feed.devices |= devices
        for device_id in devices:
            self._by_device.setdefault(device_id, set()).add(feed)

    def unsubscribe(self, feed: SocketFeed, devices: set[str] | None) -> None:
        if devices is None:
            self.detach(feed)
            self._all.add(feed)
            return
        for device_id in devices & feed.devices:
            members = self._by_device.get(device_id)
            if members is not None:
                members.discard(feed)
                if not members:
                    del self._by_device[device_id]
        feed.devices -= devices

    @property
    def sockets(self) -> int:
        return len(self._all)

    # --- the layer side -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                if self.channel_name is None:
                    # The default prefix: channels_redis multiplexes a process's channels over one Redis list only
                    # when they share it; another prefix would make this receive and others block each other.
                    self.channel_name = await self._layer.new_channel()
                await self._layer.group_add(EVENTS_GROUP, self.channel_name)
                await self._order.start()
                membership = keep_membership(self._layer, EVENTS_GROUP, self.channel_name, GROUP_REFRESH)
                refresher = asyncio.create_task(membership)
                self.ready.set()
                delay = 0.5
                try:
                    while True:
                        await self.dispatch(await self._layer.receive(self.channel_name))
                finally:
                    refresher.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Batches sent meanwhile are lost to this process; the sequence check turns them into gaps.
                self.ready.clear()
                metrics.HUB_ERRORS.inc()
                logger.warning("channel layer receive failed (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP)

    async def dispatch(self, message: dict[str, Any]) -> None:
        try:
            batch = parse_events_message(message)
        except ValueError as exc:
            metrics.HUB_INVALID.inc()
            logger.warning("ignored channel-layer message: %s", exc)
            return
        metrics.HUB_BATCHES.inc()
        self._count_losses(batch)
        events, gap = await self._order.admit(batch["events"])
        if gap is not None:
            for feed in self._all:
                feed.gap(*gap)
        self._route(events)

    def _route(self, events: list[WireEvent]) -> None:
        """Push each event to the sockets that want it, in id order. A socket subscribed to every device and to no
        device by name gets the batch in one call, as a ``Chunk`` shared by all such sockets that may see every
        device (its frame is joined once); the others, event by event."""
        by_device = self._by_device
        mixed = [feed for feed in self._wildcard if feed.devices]
        if by_device or mixed:
            for event in events:
                device_id = event["device"]
                targets = by_device.get(device_id)
                if targets:
                    for feed in targets:
                        feed.push(event)
                for feed in mixed:
                    if feed.access.can_view(device_id) and (targets is None or feed not in targets):
                        feed.push(event)
        shared: Chunk | None = None
        for feed in self._wildcard:
            if feed.devices:
                continue
            access = feed.access
            if access.everything:
                shared = shared or Chunk(events)
                feed.push_many(shared)
            else:
                feed.push_many(Chunk([e for e in events if access.can_view(e["device"])]))

    def _count_losses(self, batch: EventsMessage) -> None:
        """Count batches lost in the layer, by each source's sequence (``IdOrder`` recovers their events)."""
        source, seq = batch["source"], batch["seq"]
        previous = self._sources.get(source)
        if previous is not None and seq <= previous:
            return  # late (reordered in transit): neither rewind nor report a loss
        self._sources[source] = seq
        self._sources.move_to_end(source)
        while len(self._sources) > _MAX_SOURCES:
            self._sources.popitem(last=False)
        if previous is not None and seq > previous + 1:
            metrics.HUB_LOST.inc(seq - previous - 1)
            logger.warning("lost %d event batch(es) from %s in the channel layer", seq - previous - 1, source)
