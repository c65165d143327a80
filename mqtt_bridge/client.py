"""The MQTT client wrapper: the only module that imports aiomqtt (and reaches the paho client under it).

It adds what the bridge needs and aiomqtt does not expose: manual acknowledgement of QoS 1 messages (so a message
is acknowledged only after it is stored), batch receive, a bounded incoming queue whose drops are counted (and
never strand a QoS 1 message), and errors of our own (``BrokerUnavailable``) instead of aiomqtt's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

import aiomqtt
import paho.mqtt._packet
import paho.mqtt.client
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_bridge.ratelimit import RateLimitedLog

logger = logging.getLogger(__name__)


# The logger aiomqtt (and paho under it) write to.
_library_logger = logging.getLogger("mqtt_bridge.aiomqtt")


# --- paho fast paths ------------------------------------------------------------------------------------------
# paho-mqtt 2.x spends most of a received message's cost outside the message: it reads each packet with three or
# more recv() calls and one event-loop wake-up (aiomqtt calls ``loop_read`` once per readable event, and it reads one
# packet), and for MQTT 5 builds a ``Properties`` object whose constructor fills two 27-entry tables and whose
# ``clear`` walks them, even for a PUBLISH without properties, and walks a topic trie for callbacks nobody registered.
# With the changes below, draining 30,000 queued
# QoS 1 messages into the bridge (SQLite, memory layer) took 95 us of the bridge's CPU per message instead of 190,
# storage included. They keep paho's behaviour (tests/mqtt_bridge/test_client_paho_fast_paths.py checks both against
# paho's own results); they rest on paho 2.1-2.2 internals, which is one reason paho-mqtt is pinned below 2.3.


# paho's lookup tables, the same for every ``Properties`` and never written after construction.
_PROPERTY_TABLES = {
    key: value
    for key, value in vars(Properties(PacketTypes.PUBLISH)).items()  # type: ignore[no-untyped-call]
    if key in ("types", "names", "properties")
}


class _FastProperties(Properties):
    """paho's ``Properties`` with its lookup tables shared (``_PROPERTY_TABLES``) and a ``clear`` that only removes
    what was set. Installed as the class paho's packet decoder builds."""

    _own = frozenset({"packetType", *_PROPERTY_TABLES})

    def __init__(self, packetType: int) -> None:
        self.__dict__.update(_PROPERTY_TABLES, packetType=packetType)

    def clear(self) -> None:
        for name in [name for name in self.__dict__ if name not in self._own]:
            delattr(self, name)


paho.mqtt._packet.Properties = _FastProperties  # type: ignore[attr-defined]


class _BufferedReads:
    """Receives for one paho client from a buffer filled by one ``recv`` of up to 64 KiB, instead of a system call
    per field (``paho.Client._sock_recv`` asks for 1 byte, then 1 per length byte, then the rest)."""

    SIZE = 65536

    def __init__(self, client: paho.mqtt.client.Client) -> None:
        self._recv = client._sock_recv  # paho's own: handles TLS and a closed socket
        self._data = b""
        self._pos = 0

    @property
    def buffered(self) -> bool:
        return self._pos < len(self._data)

    def __call__(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._recv(self.SIZE)  # BlockingIOError when nothing is there: paho waits for the next event
            if not data:
                return data  # end of stream: paho reports the connection lost
            self._data, self._pos = data, 0
        start = self._pos
        self._pos = min(start + bufsize, len(self._data))
        return self._data[start : self._pos]


class _TopicCallbacks(MQTTMatcher):
    """paho's per-topic callbacks (``message_callback_add``), skipped while there are none: paho matches every
    message's topic against them (a trie walk in Python) before calling ``on_message``, and aiomqtt registers none."""

    def iter_match(self, topic: str) -> Iterator[Any]:
        if not self._root._children:
            return iter(())
        return super().iter_match(topic)  # type: ignore[no-untyped-call,no-any-return]


def _use_fast_paths(client: paho.mqtt.client.Client) -> None:
    """Make ``client`` read through a ``_BufferedReads`` and, per readable event, handle every packet it holds (not
    one packet per event-loop wake-up: data already taken from the socket would wake nothing); and skip its
    per-topic callback matching while there are no such callbacks."""
    reads = _BufferedReads(client)
    read_packets = client.loop_read

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        rc = read_packets(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and reads.buffered and client._sock is not None:
            rc = read_packets(max_packets)
        return rc

    client._sock_recv = reads  # type: ignore[method-assign]
    client.loop_read = loop_read  # type: ignore[method-assign]
    client._on_message_filtered = _TopicCallbacks()  # type: ignore[no-untyped-call]


class MqttError(Exception):
    """Base class of the wrapper's errors."""


class BrokerUnavailable(MqttError):
    """The broker refused or lost the connection; the message says where and why."""


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str
    port: int
    client_id: str
    protocol: str = "5"
    tls: bool = False
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    session_expiry: int = 3600
    receive_maximum: int = 1000
    queue_max: int = 20000
    persistent: bool = True

    @classmethod
    def from_settings(cls, mqtt: Mapping[str, Any]) -> MqttConfig:
        return cls(
            **{
                "host": mqtt["HOST"],
                "port": mqtt["PORT"],
                "client_id": mqtt["CLIENT_ID"],
                "protocol": mqtt["PROTOCOL"],
                "tls": mqtt["TLS"],
                "username": mqtt["USERNAME"],
                "password": mqtt["PASSWORD"],
                "keepalive": mqtt["KEEPALIVE"],
                "session_expiry": mqtt["SESSION_EXPIRY"],
                "receive_maximum": mqtt["RECEIVE_MAXIMUM"],
                "queue_max": mqtt["QUEUE_MAX"],
            }
        )

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int


class _BoundedQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue. QoS 0 messages past ``limit`` are discarded (``on_drop`` is told each one's QoS).

    A QoS 1 message is not discarded there: it would stay unacknowledged, and a broker redelivers only on a new
    connection, so it would be stranded (holding one of the broker's in-flight slots) for as long as the connection
    lasts. QoS 1 messages are bounded by the broker's in-flight window (``in_flight``, the receive maximum) instead;
    one past ``limit + in_flight`` (a broker ignoring the window) is discarded too, and the client reconnects.
    """

    limit = 0
    in_flight = 0
    on_drop: Callable[[int], None] = staticmethod(lambda qos: None)

    def put_nowait(self, item: aiomqtt.Message) -> None:
        size = self.qsize()
        if size >= self.limit and (item.qos == 0 or size >= self.limit + self.in_flight):
            # Counted and logged (once a minute) by ``on_drop``; not raising QueueFull spares aiomqtt's log line per
            # discarded message (thousands in a burst).
            self.on_drop(item.qos)
            return
        super().put_nowait(item)


_generations = 0


class MqttClient:
    """One broker connection, used as ``async with``. Create a new one to reconnect."""

    def __init__(self, config: MqttConfig, *, on_drop: Callable[[], None] | None = None) -> None:
        global _generations
        _generations += 1
        self.config = config
        self.generation = _generations
        self._on_drop = on_drop
        self._client: aiomqtt.Client | None = None
        self._messages: Any = None
        self._pending: asyncio.Future[aiomqtt.Message] | None = None
        self._stranded = False  # a QoS 1 message was discarded: only a new connection gets it redelivered
        self._discards = RateLimitedLog(logger)

    def _dropped(self, qos: int) -> None:
        if self._on_drop is not None:
            self._on_drop()
        self._discards.warning(
            "queue_full",
            "incoming queue of %s full: discarding messages (counted in gateway_mqtt_queue_dropped_total; QoS 1 ones "
            "are redelivered after a reconnect)",
            self.config.where,
        )
        if qos > 0:
            self._stranded = True

    def _build(self) -> aiomqtt.Client:
        config = self.config
        queue_type = type(
            "BridgeQueue",
            (_BoundedQueue,),
            {"limit": config.queue_max, "in_flight": config.receive_maximum, "on_drop": staticmethod(self._dropped)},
        )
        kwargs: dict[str, Any] = {}
        if config.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = config.session_expiry if config.persistent else 0
            properties.ReceiveMaximum = config.receive_maximum
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V5, clean_start=not config.persistent, properties=properties)
        else:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=not config.persistent)
        client = aiomqtt.Client(
            config.host,
            config.port,
            identifier=config.client_id,
            username=config.username,
            password=config.password,
            keepalive=config.keepalive,
            tls_context=ssl.create_default_context() if config.tls else None,
            queue_type=queue_type,  # bounded by its own rules (see _BoundedQueue), not by a maxsize
            logger=_library_logger,
            timeout=10,
            # Without it, Nagle's algorithm meets the broker's delayed ACKs and holds small packets (a command, a
            # PUBACK) for ~40 ms: the command round trip measured 96 ms at p50 instead of ~18.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            **kwargs,
        )
        # Acknowledge after storage: must be set before connecting, or a persistent session's queued messages are
        # acknowledged automatically as they arrive.
        client._client.manual_ack_set(True)
        _use_fast_paths(client._client)
        return client

    async def __aenter__(self) -> Self:
        self._client = self._build()
        try:
            await self._connect(self._client)
        except aiomqtt.MqttError as exc:
            self._client = None
            raise BrokerUnavailable(f"cannot connect to {self.config.where}: {exc}") from exc
        except OSError as exc:
            self._client = None
            raise BrokerUnavailable(f"cannot connect to {self.config.where}: {exc}") from exc
        self._messages = self._client.messages.__aiter__()
        return self

    @staticmethod
    async def _connect(client: aiomqtt.Client) -> None:
        """Connect, failing as soon as the connection closes before the broker's CONNACK.

        aiomqtt ignores a disconnect that comes before CONNACK and waits out its whole timeout (10 s), as with a
        proxy or load balancer that accepts the connection while the broker behind it is down, or a broker at its
        connection limit: every attempt would cost 10 s, and the bridge would come back that much later.
        """
        closed = asyncio.get_running_loop().create_future()
        on_disconnect = client._client.on_disconnect

        def on_disconnect_before_connack(*args: Any) -> None:
            if on_disconnect is not None:
                on_disconnect(*args)
            if not closed.done():
                closed.set_result(None)

        client._client.on_disconnect = on_disconnect_before_connack
        connecting = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.wait({connecting, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            client._client.on_disconnect = on_disconnect
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await connecting
        if connecting.cancelled():
            raise aiomqtt.MqttError("the connection closed before the broker acknowledged it (no CONNACK)")
        connecting.result()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        client, self._client = self._client, None
        if self._pending is not None:
            # Closing: an unacknowledged QoS 1 message it may hold is redelivered on the next connection.
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._pending
            self._pending = None
        if client is None:
            return
        try:
            await client.__aexit__(exc_type, exc, tb)
        except aiomqtt.MqttError as error:
            logger.debug("disconnect from %s: %s", self.config.where, error)

    def _require(self) -> aiomqtt.Client:
        if self._client is None:
            raise BrokerUnavailable(f"not connected to {self.config.where}")
        return self._client

    async def subscribe(self, filters: list[str], *, qos: int = 1) -> None:
        client = self._require()
        try:
            await client.subscribe([(topic, qos) for topic in filters])
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"subscribe to {filters} on {self.config.where} failed: {exc}") from exc

    async def unsubscribe(self, filters: list[str]) -> None:
        client = self._require()
        try:
            await client.unsubscribe(filters)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"unsubscribe from {filters} on {self.config.where} failed: {exc}") from exc

    async def end_session(self) -> None:
        """Discard this client id's persistent session on the broker (and its queue) by connecting once with a
        clean start and no session expiry. Call it after this connection has been closed."""
        ending = replace(self.config, persistent=False)
        try:
            async with MqttClient(ending, on_drop=self._on_drop):
                pass
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(f"could not end the session of {self.config.client_id!r}: {exc}") from exc

    async def receive_into(
        self, batch: list[InboundMessage], *, max_items: int, linger: float, first_within: float | None = None
    ) -> None:
        """Append at least one message to ``batch``, then what arrives within ``linger`` s, up to ``max_items``.
        With ``first_within``, return with nothing appended if no message comes within that many seconds.

        Appends in place, so a cancelled call leaves what it had already taken in ``batch``; a message being
        fetched when the call is cancelled or times out is kept for the next call, never dropped.
        """
        self._require()
        if self._stranded and self._drained():
            raise BrokerUnavailable(
                f"a QoS 1 message from {self.config.where} was discarded (incoming queue full); reconnecting so "
                "that the broker redelivers it"
            )
        try:
            first = await self._next(within=first_within)
            if first is None:
                return
            batch.append(self._convert(first))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + linger
            while len(batch) < max_items:
                if self._drain(batch, max_items):
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                message = await self._next(within=remaining)
                if message is None:
                    break
                batch.append(self._convert(message))
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"connection to {self.config.where} lost: {exc}") from exc

    def _drained(self) -> bool:
        """Everything received has been handed out (and stored by the caller). A fetch left waiting by an earlier
        call's linger holds nothing yet: it is cancelled (after a burst the queue stays empty, and a waiting fetch
        would keep a discarded message stranded for as long as the connection lasts)."""
        if self._client is None or not self._client._queue.empty():
            return False
        if self._pending is not None:
            if self._pending.done():
                return False  # it took a message: that one is handed out first
            self._pending.cancel()
            self._pending = None
        return True

    async def _next(self, *, within: float | None) -> aiomqtt.Message | None:
        """The next message, or ``None`` after ``within`` seconds. Unlike ``wait_for`` around the iterator, a timeout or
        cancellation never cancels a fetch that already took a message off the queue: it stays pending."""
        pending = self._pending
        if pending is None:
            pending = self._pending = asyncio.ensure_future(self._messages.__anext__())
        done, _ = await asyncio.wait({pending}, timeout=within)
        if not done:
            return None
        if self._pending is pending:
            self._pending = None
        return pending.result()  # CancelledError when the connection was closed meanwhile

    def _drain(self, batch: list[InboundMessage], max_items: int) -> bool:
        """Take what is already queued without a task per message (aiomqtt's iterator makes one each)."""
        assert self._client is not None
        queue = self._client._queue
        taken = False
        while len(batch) < max_items and not queue.empty():
            batch.append(self._convert(queue.get_nowait()))
            taken = True
        return taken

    def _convert(self, message: aiomqtt.Message) -> InboundMessage:
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        return InboundMessage(
            topic=message.topic.value,
            payload=bytes(payload),
            qos=message.qos,
            retain=message.retain,
            mid=message.mid,
            generation=self.generation,
        )

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a QoS 1 message received on this connection (ids from an older one mean nothing now)."""
        if message.qos == 0 or message.generation != self.generation or self._client is None:
            return
        self._client._client.ack(message.mid, message.qos)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        ack_within: float = 10.0,
    ) -> None:
        """Publish and, at QoS 1, wait for the broker's acknowledgement. Response topic and correlation data are
        sent on MQTT 5 and dropped on 3.1.1, which has no properties."""
        client = self._require()
        properties = None
        if self.config.protocol == "5" and (response_topic or correlation_data):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data:
                properties.CorrelationData = correlation_data
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, properties=properties, timeout=ack_within)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"publish to {topic!r} on {self.config.where} failed: {exc}") from exc
