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
from typing import Any

from gateway import metrics
from gateway.events import EVENTS_GROUP, EventsMessage, parse_events_message
from gateway.feed import SocketFeed

logger = logging.getLogger(__name__)

GROUP_REFRESH = 600.0  # re-add the hub's channel to the group well within any layer's group expiry
_MAX_SOURCES = 1000


class Hub:
    _instances: dict[tuple[int, int], Hub] = {}

    def __init__(self, layer: Any) -> None:
        self._layer = layer
        self._all: set[SocketFeed] = set()
        self._wildcard: set[SocketFeed] = set()
        self._by_device: dict[str, set[SocketFeed]] = {}
        self._sources: OrderedDict[str, tuple[int, int]] = OrderedDict()
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
                refresher = asyncio.create_task(self._refresh_membership(self.channel_name))
                self.ready.set()
                delay = 0.5
                try:
                    while True:
                        self.dispatch(await self._layer.receive(self.channel_name))
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
                delay = min(delay * 2, 10.0)

    async def _refresh_membership(self, channel: str) -> None:
        while True:
            await asyncio.sleep(GROUP_REFRESH)
            await self._layer.group_add(EVENTS_GROUP, channel)

    def dispatch(self, message: dict[str, Any]) -> None:
        try:
            batch = parse_events_message(message)
        except ValueError as exc:
            metrics.HUB_INVALID.inc()
            logger.warning("ignored channel-layer message: %s", exc)
            return
        metrics.HUB_BATCHES.inc()
        self._check_sequence(batch)
        wildcard, by_device = self._wildcard, self._by_device
        for event in batch["events"]:
            device_id = event["device"]
            targets = by_device.get(device_id)
            if targets:
                for feed in targets:
                    feed.push(event)
            for feed in wildcard:
                if feed.access.can_view(device_id) and (targets is None or feed not in targets):
                    feed.push(event)

    def _check_sequence(self, batch: EventsMessage) -> None:
        source, seq = batch["source"], batch["seq"]
        last_id = batch["events"][-1]["id"] if batch["events"] else batch["prev_id"]
        previous = self._sources.get(source)
        if previous is not None and seq <= previous[0]:
            return  # late (reordered in transit): deliver it, but neither rewind nor report a loss
        self._sources[source] = (seq, max(last_id, previous[1] if previous else 0))
        self._sources.move_to_end(source)
        while len(self._sources) > _MAX_SOURCES:
            self._sources.popitem(last=False)
        if previous is None or seq == previous[0] + 1:
            return
        if seq > previous[0] + 1:
            metrics.HUB_LOST.inc(seq - previous[0] - 1)
            if batch["prev_id"] > previous[1]:
                logger.warning("lost %d event batch(es) from %s in the channel layer", seq - previous[0] - 1, source)
                for feed in self._all:
                    feed.gap(previous[1] + 1, batch["prev_id"])
