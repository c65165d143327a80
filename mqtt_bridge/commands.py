"""Publishing commands: claim from the database (the queue), publish at QoS 1, record ``sent`` on the broker's
acknowledgement; and the sweeper that gives overdue commands their final state.

Deadlines run on this process's monotonic clock from the moment it claims a command; commands it does not hold
(another bridge crashed with them) are swept by wall clock, after a grace period of one lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from django.db import DatabaseError
from django.utils import timezone

from devices.records import CommandToSend, EventRecord
from devices.services import DATABASE_UNAVAILABLE
from gateway.events import COMMANDS_GROUP, GROUP_REFRESH, keep_membership
from mqtt_bridge import metrics
from mqtt_bridge.client import BrokerUnavailable, MqttClient
from mqtt_bridge.store import BridgeStore
from mqtt_bridge.topics import Channel, Topics

logger = logging.getLogger(__name__)

Announce = Callable[[list[EventRecord]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CommandSettings:
    poll_interval: float = 1.0
    lease: float = 10.0
    batch: int = 100
    hold_offline: bool = False


def command_payload(command: CommandToSend, *, ttl: float) -> bytes:
    """What the device receives on ``PREFIX/ID/commands/NAME`` (contract section 1 and 2)."""
    return orjson.dumps(
        {
            "id": command.id,
            "params": command.params,
            "ts": command.created_at,
            "expires": command.expires_at,
            "ttl": round(max(0.0, ttl), 3),
        }
    )


class CommandDispatcher:
    def __init__(
        self,
        *,
        owner: str,
        store: BridgeStore,
        layer: Any,
        topics: Topics,
        settings: CommandSettings,
        announce: Announce,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.owner = owner
        self._store = store
        self._layer = layer
        self._topics = topics
        self._settings = settings
        self._announce = announce
        self._clock = clock
        self._wake = asyncio.Event()
        self.deadlines: dict[str, float] = {}  # command id -> monotonic deadline, for commands this bridge claimed

    async def listen_for_wakeups(self) -> None:
        """Join the commands group (renewing the membership, so only a dead bridge's expires) and turn each wake-up
        message into a claim round."""
        delay = 0.5
        channel: str | None = None
        while True:
            try:
                if channel is None:
                    channel = await self._layer.new_channel()
                await self._layer.group_add(COMMANDS_GROUP, channel)
                renewal = asyncio.create_task(keep_membership(self._layer, COMMANDS_GROUP, channel, GROUP_REFRESH))
                try:
                    while True:
                        await self._layer.receive(channel)
                        self._wake.set()
                finally:
                    renewal.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the poll interval still delivers every command
                logger.warning("commands wake-up channel failed (%r); polling only, retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def publish_loop(self, client: MqttClient) -> None:
        """Claim and publish until the connection goes (``BrokerUnavailable`` ends it quietly)."""
        try:
            while True:
                try:
                    claimed = await self._publish_round(client)
                except (DatabaseError, *DATABASE_UNAVAILABLE) as exc:
                    # The database is away: what was claimed keeps its lease (published again once it lapses, with
                    # the same id), what was not is claimed at a later round. Never let the loop die of it.
                    logger.warning("command publishing waits for the database: %r", exc)
                    claimed = 0
                if claimed < self._settings.batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval)
                    self._wake.clear()
        except BrokerUnavailable as exc:
            logger.info("command publishing paused: %s", exc)

    async def _publish_round(self, client: MqttClient) -> int:
        """Claim a batch of pending commands and publish them; how many were claimed."""
        claimed = await self._store.claim_commands(
            owner=self.owner,
            lease=self._settings.lease,
            limit=self._settings.batch,
            hold_offline=self._settings.hold_offline,
        )
        for command in claimed:
            try:
                await self._publish(client, command)
            except (BrokerUnavailable, *DATABASE_UNAVAILABLE):
                raise
            except Exception as exc:  # one bad command must never stop the others
                logger.exception("command %s could not be published", command.id)
                await self._announce(
                    await self._store.fail_command(command_id=command.id, error=f"publish_error: {exc}"[:200])
                )
        return len(claimed)

    async def _publish(self, client: MqttClient, command: CommandToSend) -> None:
        now_wall, now_mono = time.time(), self._clock()
        remaining = command.expires_at - now_wall
        self.deadlines.setdefault(command.id, now_mono + remaining)
        ttl = self.deadlines[command.id] - now_mono
        topic = self._topics.command(command.device_id, command.name)  # TopicError: a tampered row, failed above
        try:
            await client.publish(
                topic,
                command_payload(command, ttl=ttl),
                qos=1,
                response_topic=self._topics.device(command.device_id, Channel.REPLIES),
                correlation_data=command.id.encode(),
            )
        except BrokerUnavailable:
            await self._store.release_claim(command_id=command.id)
            raise
        metrics.COMMANDS_PUBLISHED.inc()
        await self._announce(await self._store.mark_sent(command_id=command.id, owner=self.owner))

    async def sweep_loop(self) -> None:
        """Every poll interval, expire what is overdue: by this bridge's monotonic clock for what it holds, by
        wall clock (one lease late) for the rest."""
        while True:
            await asyncio.sleep(self._settings.poll_interval)
            try:
                await self.sweep()
            except Exception as exc:
                logger.warning("command sweep failed: %r", exc)

    async def sweep(self) -> None:
        now = self._clock()
        due = [command_id for command_id, deadline in self.deadlines.items() if deadline <= now]
        grace = timedelta(seconds=self._settings.lease)
        # What this bridge holds expires by its monotonic clock only: a wall clock stepped forward (NTP, an operator)
        # must not expire it early through the catch-all.
        held = [command_id for command_id in self.deadlines if command_id not in due]
        events = await self._store.expire_commands(command_ids=due, overdue_before=timezone.now() - grace, held=held)
        for command_id in due:
            self.deadlines.pop(command_id, None)
        if events:
            for event in events:
                metrics.COMMANDS_FINISHED.labels(str(event.body.get("state"))).inc()
            await self._announce(events)
