"""The bridge engine: MQTT in, validated, stored in batches, acknowledged, then announced on the channel layer.

Like Channels' ``Worker``, it is a plain class that takes its collaborators (a client factory, a channel layer,
settings) and exposes ``async run()``; ``runbridge`` and ``rungateway`` are thin commands around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError

from devices.records import EventKind, EventRecord, IngestResult, Observation, Rejection, Reply
from devices.services import DATABASE_UNAVAILABLE
from gateway.events import EVENTS_GROUP, EventsPublisher
from mqtt_bridge import metrics
from mqtt_bridge.backoff import Backoff
from mqtt_bridge.client import BrokerUnavailable, InboundMessage, MqttClient
from mqtt_bridge.commands import CommandDispatcher, CommandSettings
from mqtt_bridge.decoder import DecodeError, MessageDecoder
from mqtt_bridge.ratelimit import RateLimitedLog
from mqtt_bridge.store import BridgeStore
from mqtt_bridge.topics import Topics

logger = logging.getLogger(__name__)

LAYER_CHUNK = 500  # events per channel-layer message, to bound message size
STATUS_ROLE = "status"  # the lease naming the one bridge that subscribes to status when several share the load


@dataclass(frozen=True, slots=True)
class BridgeState:
    """What the bridge is doing, as its process reports it (systemd STATUS lines, logs)."""

    connected: bool
    attempted: bool  # at least one connection attempt has finished, either way
    detail: str
    records_presence: bool

    def describe(self, where: str) -> str:
        if self.connected:
            presence = "records presence" if self.records_presence else "presence recorded by another bridge"
            return f"connected to {where}; {presence}"
        if self.detail:
            return f"waiting for the broker at {where}: {self.detail}"
        return f"connecting to {where}"


class StatusRole:
    """Whether this bridge subscribes to status and records presence.

    Status cannot go through a shared subscription (retained status is not delivered to one), and if every bridge
    subscribed to it directly each one would record every change: two copies of each transition, applied in an
    order that depends on each bridge's backlog. So with a shared group exactly one bridge, the holder of the
    ``status`` lease, subscribes to status; another takes over (and gets the retained statuses) once the lease
    lapses. Without a shared group the bridge is alone and always records presence.
    """

    def __init__(self, *, store: BridgeStore, owner: str, ttl: float, contested: bool) -> None:
        self._store = store
        self._owner = owner
        self._ttl = ttl
        self._contested = contested
        self.held = not contested

    async def claim(self) -> bool:
        """Take or renew the role; True when that changed whether this bridge holds it."""
        if not self._contested:
            return False
        try:
            held = await self._store.hold_lease(name=STATUS_ROLE, owner=self._owner, ttl=self._ttl)
        except (DatabaseError, *DATABASE_UNAVAILABLE) as exc:
            logger.warning("could not renew the status role: %s", exc)
            return False  # keep what we had: the lease decides again once the database answers
        changed, self.held = held != self.held, held
        return changed

    async def release(self) -> None:
        if self._contested and self.held:
            self.held = False
            with contextlib.suppress(DatabaseError, *DATABASE_UNAVAILABLE):
                await self._store.release_lease(name=STATUS_ROLE, owner=self._owner)


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    name: str
    topic_prefix: str = "devices"
    shared_group: str | None = None
    max_payload: int = 65536
    auto_register: bool = True
    max_devices: int = 10000
    batch_max: int = 500
    batch_linger: float = 0.005
    heartbeat_interval: float = 5.0
    retention_days: int = 30
    purge_interval: float = 3600.0
    backoff_initial: float = 0.5
    backoff_cap: float = 30.0
    commands: CommandSettings = field(default_factory=CommandSettings)

    @classmethod
    def from_settings(cls, gateway: Mapping[str, Any], mqtt: Mapping[str, Any]) -> BridgeSettings:
        return cls(
            name=mqtt["CLIENT_ID"],
            topic_prefix=gateway["TOPIC_PREFIX"],
            shared_group=gateway["SHARED_GROUP"],
            max_payload=gateway["MAX_PAYLOAD"],
            auto_register=gateway["AUTO_REGISTER"],
            max_devices=gateway["MAX_DEVICES"],
            batch_max=gateway["BATCH_MAX"],
            batch_linger=gateway["BATCH_LINGER"],
            heartbeat_interval=gateway["HEARTBEAT_INTERVAL"],
            retention_days=gateway["HISTORY_RETENTION_DAYS"],
            commands=CommandSettings(
                poll_interval=gateway["COMMAND_POLL_INTERVAL"],
                lease=gateway["COMMAND_LEASE"],
                hold_offline=gateway["COMMANDS_OFFLINE"] == "hold",
            ),
        )


class Bridge:
    def __init__(
        self,
        *,
        client_factory: Callable[[], MqttClient],
        channel_layer: Any,
        settings: BridgeSettings,
        store: BridgeStore | None = None,
        on_state: Callable[[BridgeState], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_state = on_state
        self._client_factory = client_factory
        self._layer = channel_layer
        self._store = store or BridgeStore(auto_register=settings.auto_register, max_devices=settings.max_devices)
        self._topics = Topics(settings.topic_prefix)
        self._decoder = MessageDecoder(topics=self._topics, max_payload=settings.max_payload)
        self._publisher = EventsPublisher(source=f"{settings.name}.{uuid.uuid4().hex[:8]}")
        self._bad_input = RateLimitedLog(logger)
        self.commands = CommandDispatcher(
            owner=settings.name,
            store=self._store,
            layer=channel_layer,
            topics=self._topics,
            settings=settings.commands,
            announce=self._announce,
        )
        self._announce_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._client: MqttClient | None = None
        self._attempted = False
        self.status_role = StatusRole(
            store=self._store,
            owner=settings.name,
            ttl=3 * settings.heartbeat_interval,
            contested=bool(settings.shared_group),
        )
        self.last_error = ""

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def stop(self) -> None:
        """Ask ``run()`` to stop taking messages, flush what it holds, and return."""
        self._stopping.set()

    async def run(self) -> None:
        helpers = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._purges()),
            asyncio.create_task(self.commands.listen_for_wakeups()),
            asyncio.create_task(self.commands.sweep_loop()),
        ]
        try:
            await self._connection_loop()
        finally:
            for task in helpers:
                task.cancel()
            await self.status_role.release()
            with contextlib.suppress(Exception):
                await self._store.heartbeat(name=self.settings.name, connected=False, detail="stopped")

    @property
    def state(self) -> BridgeState:
        return BridgeState(
            connected=self.connected,
            attempted=self._attempted,
            detail=self.last_error,
            records_presence=self.status_role.held,
        )

    def _report(self) -> None:
        if self._on_state is not None:
            self._on_state(self.state)

    async def _connection_loop(self) -> None:
        backoff = Backoff(initial=self.settings.backoff_initial, cap=self.settings.backoff_cap)
        while not self._stopping.is_set():
            client = self._client_factory()
            try:
                async with client:
                    await self.status_role.claim()
                    await client.subscribe(self._filters())
                    if not self.status_role.held:
                        # A resumed session may still hold the subscription from when this bridge had the role.
                        await client.unsubscribe([self._topics.status_filter()])
                    self._client = client
                    self._mark_connected(True, "")
                    backoff.reset()
                    logger.info("bridge %s connected to %s", self.settings.name, client.config.where)
                    publisher = asyncio.create_task(self.commands.publish_loop(client), name="commands")
                    try:
                        await self._consume(client)
                    finally:
                        publisher.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            try:
                                await publisher
                            except Exception:  # it already logged; reconnecting must not fail because of it
                                logger.exception("command publisher ended with an error")
            except BrokerUnavailable as exc:
                metrics.RECONNECTS.inc()
                self.last_error = str(exc)
                logger.warning("%s", exc)
            finally:
                self._client = None
                self._attempted = True
                self._mark_connected(False, self.last_error)
            if self._stopping.is_set():
                break
            delay = backoff.next()
            logger.info("reconnecting in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _mark_connected(self, connected: bool, detail: str) -> None:
        (self._connected.set if connected else self._connected.clear)()
        metrics.CONNECTED.set(1 if connected else 0)
        if connected:
            self._attempted = True
        self._report()

    def _filters(self) -> list[str]:
        filters = self._topics.subscriptions(self.settings.shared_group)
        return [*filters, self._topics.status_filter()] if self.status_role.held else filters

    async def _follow_status_role(self) -> None:
        """Subscribe to status on gaining the role, unsubscribe on losing it (the connection loop does it again on
        every reconnect)."""
        client = self._client
        logger.info(
            "bridge %s %s", self.settings.name, "now records presence" if self.status_role.held else "hands presence on"
        )
        self._report()
        if client is None:
            return
        status = [self._topics.status_filter()]
        with contextlib.suppress(BrokerUnavailable):  # the connection loop reconnects and subscribes again
            await (client.subscribe(status) if self.status_role.held else client.unsubscribe(status))

    async def retire(self, *, idle: float = 2.0) -> int:
        """Leave the shared group for good (scaling bridges down); returns how many messages it stored.

        A broker keeps assigning a shared subscription's messages to a member whose session is offline, where they
        wait until the session expires and are then lost. So: resume this client id's session, unsubscribe, store
        what the broker had queued for it (until nothing comes for ``idle`` seconds), then end the session.
        """
        client = self._client_factory()
        stored = 0
        async with client:
            filters = [*self._topics.subscriptions(self.settings.shared_group), self._topics.status_filter()]
            await client.unsubscribe(filters)
            while True:
                batch: list[InboundMessage] = []
                await client.receive_into(
                    batch, max_items=self.settings.batch_max, linger=self.settings.batch_linger, first_within=idle
                )
                if not batch:
                    break
                await self.flush(client, batch)
                stored += len(batch)
        await client.end_session()
        await self.status_role.release()
        return stored

    async def _consume(self, client: MqttClient) -> None:
        stop = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                batch: list[InboundMessage] = []
                receive = asyncio.create_task(
                    client.receive_into(batch, max_items=self.settings.batch_max, linger=self.settings.batch_linger)
                )
                await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    with contextlib.suppress(asyncio.CancelledError, BrokerUnavailable):
                        await receive
                lost: BrokerUnavailable | None = None
                if receive.done() and not receive.cancelled() and receive.exception() is not None:
                    error = receive.exception()
                    if not isinstance(error, BrokerUnavailable):
                        raise error  # type: ignore[misc]
                    lost = error
                if batch:
                    await self.flush(client, batch)
                if lost is not None:
                    raise lost
        finally:
            stop.cancel()

    async def flush(self, client: MqttClient, batch: Sequence[InboundMessage]) -> None:
        """Store a batch, acknowledge it, then announce what was stored."""
        started = time.perf_counter()
        observations, replies = self._decode(batch)
        result = await self._store_batch(observations)
        if result is None:
            return  # stopping during a database outage: unacknowledged QoS 1 messages are redelivered later
        reply_events = await self._store_replies(replies)
        if reply_events is None:
            return
        for message in batch:
            client.ack(message)
        if reply_events:
            await self._announce(reply_events)
        for reason, count in result.skipped.items():
            metrics.SKIPPED.labels(reason.value).inc(count)
            if reason in (Rejection.DEVICE_CAP, Rejection.UNKNOWN_DEVICE):
                self._bad_input.warning(
                    f"skip:{reason.value}",
                    "dropped %d message(s) from unregistered devices (%s; auto-register %s, device cap %d)",
                    count,
                    reason.value,
                    self.settings.auto_register,
                    self.settings.max_devices,
                )
        if result.registered:
            logger.info("registered %d new device(s): %s", len(result.registered), ", ".join(result.registered[:10]))
        if result.stored:
            metrics.count_by_kind(metrics.STORED, result.stored)
            await self._announce(result.stored)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    def _decode(self, batch: Sequence[InboundMessage]) -> tuple[list[Observation], list[Reply]]:
        observations: list[Observation] = []
        replies: list[Reply] = []
        kinds: Counter[str] = Counter()  # counted once per batch, not once per message
        for message in batch:
            try:
                observation = self._decoder.decode(message)
            except DecodeError as exc:
                metrics.MESSAGES_IN.labels("invalid").inc()
                metrics.REJECTED.labels(exc.reason).inc()
                self._bad_input.warning(
                    f"{exc.reason}:{exc.device or message.topic[:100]}",
                    "dropped message on %r (device %s): %s",
                    message.topic[:200],
                    exc.device or "unknown",
                    exc,
                )
                continue
            if isinstance(observation, Reply):
                kinds["reply"] += 1
                replies.append(observation)
            elif observation.kind is EventKind.STATUS and not self.status_role.held:
                # Queued in this bridge's session while it held the role; the holder has the retained state.
                kinds[observation.kind.value] += 1
                metrics.SKIPPED.labels("not_presence_holder").inc()
            else:
                kinds[observation.kind.value] += 1
                observations.append(observation)
        for kind, count in kinds.items():
            metrics.MESSAGES_IN.labels(kind).inc(count)
        return observations, replies

    async def _store_replies(self, replies: list[Reply]) -> list[EventRecord] | None:
        """Record replies (``None``: stopping during a database outage, so leave them unacknowledged)."""
        if not replies:
            return []
        backoff = Backoff(initial=0.2, cap=5.0)
        while True:
            try:
                outcome = await self._store.replies(replies)
            except DATABASE_UNAVAILABLE as exc:
                metrics.STORE_RETRIES.inc()
                self._bad_input.warning("database", "database unavailable, %d replies held: %s", len(replies), exc)
                if self._stopping.is_set():
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next())
                continue
            break
        matched = len(replies) - outcome.unknown - outcome.late
        metrics.REPLIES.labels("matched").inc(matched)
        metrics.REPLIES.labels("unknown").inc(outcome.unknown)
        metrics.REPLIES.labels("late").inc(outcome.late)
        if outcome.unknown:
            self._bad_input.warning("reply:unknown", "%d repl(ies) for unknown command ids", outcome.unknown)
        for event in outcome.events:
            metrics.COMMANDS_FINISHED.labels(str(event.body.get("state"))).inc()
        return outcome.events

    async def _store_batch(self, observations: list[Observation]) -> IngestResult | None:
        if not observations:
            return IngestResult()
        backoff = Backoff(initial=0.2, cap=5.0)
        while True:
            try:
                return await self._store.ingest(observations)
            except DATABASE_UNAVAILABLE as exc:
                metrics.STORE_RETRIES.inc()
                self._bad_input.warning(
                    "database", "database unavailable, batch of %d held: %s", len(observations), exc
                )
            except DatabaseError as exc:
                logger.warning("batch of %d failed (%s); storing one by one", len(observations), exc)
                try:
                    return await self._store_one_by_one(observations)
                except DATABASE_UNAVAILABLE as outage:
                    metrics.STORE_RETRIES.inc()
                    self._bad_input.warning("database", "database unavailable, batch held: %s", outage)
            if self._stopping.is_set():
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff.next())

    async def _store_one_by_one(self, observations: list[Observation]) -> IngestResult:
        combined = IngestResult()
        for observation in observations:
            try:
                single = await self._store.ingest([observation])
            except DATABASE_UNAVAILABLE:
                raise  # the database went away: the caller holds the whole batch and retries
            except DatabaseError as exc:
                combined.skip(Rejection.STORE_ERROR)
                self._bad_input.warning(
                    f"store:{observation.device_id}",
                    "could not store %s from %s: %s",
                    observation.kind.value,
                    observation.device_id,
                    exc,
                )
                continue
            combined.stored.extend(single.stored)
            combined.registered.extend(single.registered)
            for reason, count in single.skipped.items():
                combined.skip(reason, count)
        return combined

    async def _announce(self, stored: list[EventRecord]) -> None:
        # One at a time: the ingest path, the command publisher and the sweeper all announce, and two sends in
        # flight at once could reach the layer out of sequence (the hub would report a loss and states go back).
        async with self._announce_lock:
            await self._send_announcements(stored)

    async def _send_announcements(self, stored: list[EventRecord]) -> None:
        for start in range(0, len(stored), LAYER_CHUNK):
            chunk = stored[start : start + LAYER_CHUNK]
            try:
                await self._layer.group_send(EVENTS_GROUP, self._publisher.message(chunk))
                metrics.count_by_kind(metrics.ANNOUNCED, chunk)
            except Exception as exc:  # any layer failure: the events are stored, browsers resume from history
                metrics.LAYER_FAILURES.inc(len(chunk))
                self._bad_input.warning("layer", "channel layer send failed for %d events: %s", len(chunk), exc)

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self._store.heartbeat(
                    name=self.settings.name,
                    connected=self.connected,
                    detail="" if self.connected else self.last_error,
                )
            except Exception as exc:
                self._bad_input.warning("heartbeat", "could not record bridge heartbeat: %s", exc)
            if await self.status_role.claim():
                await self._follow_status_role()
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _purges(self) -> None:
        await asyncio.sleep(min(60.0, self.settings.purge_interval))
        while True:
            try:
                removed = await self._store.purge(retention_days=self.settings.retention_days)
                if removed:
                    logger.info("purged %d events older than %d days", removed, self.settings.retention_days)
            except Exception as exc:
                self._bad_input.warning("purge", "history purge failed: %s", exc)
            await asyncio.sleep(self.settings.purge_interval)
