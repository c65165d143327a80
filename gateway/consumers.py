"""The WebSocket protocol of contract section 3, one consumer per socket.

Sockets never touch the channel layer themselves: the process's ``Hub`` is the layer's only subscriber and
pushes events into each socket's ``SocketFeed``; a sender task turns what accumulates into batched frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from devices import selectors
from devices.identifiers import is_device_id
from devices.models import Command
from devices.permissions import DeviceAccess, access_for
from devices.records import EventRecord
from devices.services import DATABASE_UNAVAILABLE, CommandRefused
from gateway import commands, metrics
from gateway.access import AccessWatcher
from gateway.announce import announce
from gateway.auth import SESSION, origin_allowed
from gateway.backpressure import WriteGate
from gateway.db import db_call
from gateway.events import PROTOCOL_VERSION, WireEvent, wire_event
from gateway.feed import SocketFeed
from gateway.hub import Hub
from gateway.ratelimit import TokenBucket

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_POLICY = 1008  # policy violation: sustained flooding
CLOSE_TOO_SLOW = 4408  # the client stopped reading what it was sent
CLOSE_INTERNAL_ERROR = 1011
MAX_DEVICES_PER_FRAME = 1000
HUB_READY_TIMEOUT = 5.0

# An alias with no layer behind it: Channels then gives the consumer no channel of its own (see module doc).
NO_CHANNEL_LAYER = "gateway.consumers-use-the-hub"


class FrameError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EventsConsumer(AsyncWebsocketConsumer):
    channel_layer_alias = NO_CHANNEL_LAYER

    feed: SocketFeed | None = None
    hub: Hub | None = None
    sender: asyncio.Task[None] | None = None
    gate: WriteGate | None = None
    user_id: int = 0
    token_id: int | None = None
    watcher: AccessWatcher | None = None
    counted: bool = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the socket; release what it holds however it ends. Daphne cancels an application that has not
        finished ``application_close_timeout`` seconds after its client left, and a cancelled consumer never gets to
        ``disconnect``: in a mass disconnect thousands of sockets stayed attached to the hub and counted."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()

    async def dispatch(self, message: Any) -> None:
        """Channels' dispatch without its ``aclose_old_connections()`` before every message (a trip to the database
        thread per client frame, connect and disconnect, which kept the thread busy for seconds when thousands of
        sockets left at once): this consumer reaches the database only through ``gateway.db.db_call``, which closes
        stale connections itself."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message.get('type')!r}")
        await handler(message)

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self._refuse(CLOSE_UNAUTHENTICATED)
            return
        if self.scope.get("auth_method") == SESSION and not origin_allowed(self.scope):
            await self._refuse(CLOSE_FORBIDDEN)
            return
        access, last_id = await _access_and_last_id(user)
        conf = settings.GATEWAY
        self.feed = SocketFeed(
            access=access,
            max_events=conf["WS_QUEUE_MAX"],
            frame_events=conf["WS_FRAME_EVENTS"],
            frame_chars=conf["WS_MAX_FRAME"],
        )
        self.hub = Hub.for_layer(get_channel_layer())
        self.hub.attach(self.feed)
        try:
            # Until the hub is in the events group, announced events would reach neither replay nor live.
            await asyncio.wait_for(self.hub.ready.wait(), HUB_READY_TIMEOUT)
        except TimeoutError:
            logger.warning("channel layer not ready after %.0f s; the client will resume later", HUB_READY_TIMEOUT)
        await self.accept()
        metrics.WS_CLIENTS.inc()
        self.counted = True
        self.gate = self.scope.get("write_gate") or WriteGate()
        await self._send(
            {
                "type": "hello",
                "protocol": PROTOCOL_VERSION,
                "user": user.get_username(),
                "server_time": time.time(),
                "last_id": last_id,
            }
        )
        self.sender = asyncio.create_task(self._send_feed(), name="gateway-ws-sender")
        self.user_id = user.pk
        self.token_id = self.scope.get("token_id")
        self.limiter = TokenBucket(rate=conf["WS_FRAMES_PER_SECOND"], burst=2 * conf["WS_FRAMES_PER_SECOND"])
        self.refused_in_a_row = 0
        self.watcher = AccessWatcher.for_loop(interval=conf["ACCESS_REFRESH"])
        self.watcher.register(self)

    # --- access kept current by the process's AccessWatcher ------------------------------------------------

    @property
    def access(self) -> DeviceAccess:
        assert self.feed is not None
        return self.feed.access

    async def access_changed(self, access: DeviceAccess) -> None:
        """Grants changed: drop subscriptions and queued events of devices the user may no longer view."""
        if self.feed is None or self.hub is None:
            return
        self.feed.access = access
        lost = {device for device in self.feed.devices if not access.can_view(device)}
        if lost:
            self.hub.unsubscribe(self.feed, lost)
        self.feed.forget(access.can_view)
        if lost:
            await self._send_subscribed()

    async def access_revoked(self) -> None:
        """The user was deactivated or deleted, or the socket's token revoked."""
        metrics.WS_REFUSED.labels(str(CLOSE_UNAUTHENTICATED)).inc()
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def _refuse(self, code: int) -> None:
        metrics.WS_REFUSED.labels(str(code)).inc()
        await self.accept()
        await self.close(code=code)

    async def disconnect(self, code: int) -> None:
        sender = self.sender
        self._release()
        if sender is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    def _release(self) -> None:
        """Leave the hub and the access watcher, stop the sender and uncount the socket: once, and synchronously (it
        also runs while the consumer is being cancelled)."""
        feed, self.feed = self.feed, None
        if feed is None:
            return
        if self.counted:
            metrics.WS_CLIENTS.dec()
            self.counted = False
        if self.watcher is not None:
            self.watcher.unregister(self)
        if self.hub is not None:
            self.hub.detach(feed)
        if self.sender is not None:
            self.sender.cancel()

    async def _send_feed(self) -> None:
        """Frames from the feed, while the client reads them: while it does not, events wait in the bounded feed
        (overflow becomes a gap), and a client that reads nothing for ``WS_STALL_TIMEOUT`` seconds is closed.

        A frame the server cannot send closes the socket (1011) rather than leave it open with no sender: the client
        reconnects and resumes instead of waiting forever."""
        assert self.feed is not None and self.gate is not None
        try:
            while True:
                if not await self.gate.wait_open(settings.GATEWAY["WS_STALL_TIMEOUT"]):
                    metrics.WS_STALLED.inc()
                    await self.close(code=CLOSE_TOO_SLOW)
                    return
                for text in await self.feed.next_frames():
                    await self.send(text_data=text)
                    metrics.WS_FRAMES.inc()
        except Exception:
            logger.exception("WebSocket sender failed; closing the socket (the client resumes)")
            await self.close(code=CLOSE_INTERNAL_ERROR)

    async def _send(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=orjson.dumps(frame).decode())
        metrics.WS_FRAMES.inc()

    async def _error(self, code: str, message: str, ref: Any = None) -> None:
        metrics.WS_ERRORS.labels(code).inc()
        frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if isinstance(ref, str):
            frame["ref"] = ref[:200]
        await self._send(frame)

    # --- client frames ------------------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.feed is None:
            return
        if not self.limiter.allow():
            await self._too_fast(text_data)
            return
        self.refused_in_a_row = 0
        if text_data is None:
            await self._error("bad_frame", "binary frames are not supported; send JSON text")
            return
        if len(text_data) > settings.GATEWAY["WS_MAX_FRAME"]:
            await self._error(
                "too_large",
                f"frame of {len(text_data)} characters exceeds {settings.GATEWAY['WS_MAX_FRAME']}",
            )
            return
        try:
            frame = orjson.loads(text_data)
        except orjson.JSONDecodeError as exc:
            await self._error("bad_json", f"frame is not JSON: {exc}")
            return
        if not isinstance(frame, dict):
            await self._error("bad_frame", f"frame must be a JSON object, got {type(frame).__name__}")
            return
        ref = frame.get("request_id")
        op = frame.get("op")
        handler = (
            {
                "subscribe": self.op_subscribe,
                "unsubscribe": self.op_unsubscribe,
                "resume": self.op_resume,
                "ping": self.op_ping,
                "command": self.op_command,
            }.get(op)
            if isinstance(op, str)
            else None
        )
        if handler is None:
            await self._error(
                "unknown_op", f"unknown op {op!r}: use subscribe, unsubscribe, resume, command or ping", ref
            )
            return
        try:
            await handler(frame)
        except FrameError as exc:
            await self._error(exc.code, str(exc), ref)

    async def _too_fast(self, text_data: str | None) -> None:
        """Over the frame rate: an error for the first refused frame and for each refused request (so a client
        waiting on a request_id hears about it), silence for the rest, a close when it goes on (abuse)."""
        self.refused_in_a_row += 1
        ref = _request_id_of(text_data)
        if self.refused_in_a_row == 1 or ref is not None:
            await self._error("rate_limited", f"more than {self.limiter.rate:g} frames per second; slow down", ref)
        if self.refused_in_a_row > self.limiter.burst * 5:
            metrics.WS_REFUSED.labels(str(CLOSE_POLICY)).inc()
            await self.close(code=CLOSE_POLICY)

    async def op_ping(self, frame: dict[str, Any]) -> None:
        await self._send({"type": "pong"})

    async def op_command(self, frame: dict[str, Any]) -> None:
        """Store the command (or find the one with this request_id) and answer with its current state: through the
        hub when this socket is subscribed to the device, directly otherwise (so never twice)."""
        assert self.feed is not None and self.hub is not None
        device, name = frame.get("device"), frame.get("name")
        if not isinstance(device, str) or not isinstance(name, str):
            raise FrameError("bad_frame", "command needs string fields device and name")
        if not self.hub.ready.is_set():
            # The layer is down: the command's states could not reach this socket (or wake a bridge) until it is back.
            raise FrameError("unavailable", "the gateway's channel layer is down; command not stored, try again soon")
        try:
            outcome = await _request_command(
                user=self.scope["user"], access=self.feed.access, device_id=device, name=name, fields=frame
            )
        except CommandRefused as exc:
            raise FrameError(exc.code, str(exc)) from None
        except DATABASE_UNAVAILABLE:
            raise FrameError(
                "unavailable", "the database is unavailable; try again soon with the same request_id"
            ) from None
        command = outcome.command
        if outcome.created:
            await announce(outcome.events, wake_bridges=command.state == Command.State.PENDING)
            if self.feed.wants(command.device_id):
                return  # the hub delivers the new state to this socket like every other subscriber
            current = outcome.events[-1]
        else:
            found = await _command_event(command.id, command.device_id)
            if found is None:
                raise FrameError("unknown_command", f"command {command.id} has no recorded state")
            current = found
        # Through this socket's feed, behind what is already queued for it: a frame sent past the queue could
        # carry an id above events still waiting, and a client resuming from its highest id would skip those.
        self.feed.push(wire_event(current))

    async def op_subscribe(self, frame: dict[str, Any]) -> None:
        assert self.feed is not None and self.hub is not None
        devices = _devices_field(frame)
        after = _after_field(frame, required=False)
        wanted: set[str] | None
        if devices is None:
            wanted = None
        else:
            cap = settings.GATEWAY["WS_MAX_SUBSCRIPTIONS"]
            if len(self.feed.devices | set(devices)) > cap:
                raise FrameError("too_many_subscriptions", f"a socket may subscribe to at most {cap} devices")
            wanted = await _visible(self.feed.access, devices)
            unknown = sorted(set(devices) - wanted)
            if unknown:
                shown = ", ".join(repr(device)[:70] for device in unknown[:10])
                await self._error("unknown_device", f"unknown device(s): {shown}", frame.get("request_id"))
        if after is None:
            self.hub.subscribe(self.feed, wanted)
            await self._send_subscribed()
            return
        self.feed.hold()
        try:
            self.hub.subscribe(self.feed, wanted)
            await self._send_subscribed()
            replay_for = wanted if wanted is not None else _wildcard_devices(self.feed.access)
            await self._replay(after, replay_for)
        except BaseException:
            self.feed.release()
            raise

    async def op_unsubscribe(self, frame: dict[str, Any]) -> None:
        assert self.feed is not None and self.hub is not None
        devices = _devices_field(frame)
        self.hub.unsubscribe(self.feed, None if devices is None else set(devices))
        await self._send_subscribed()

    async def op_resume(self, frame: dict[str, Any]) -> None:
        assert self.feed is not None
        after = _after_field(frame, required=True)
        assert after is not None
        self.feed.hold()
        try:
            replay_for = _wildcard_devices(self.feed.access) if self.feed.wildcard else set(self.feed.devices)
            await self._replay(after, replay_for)
        except BaseException:
            self.feed.release()
            raise

    async def _replay(self, after: int, devices: set[str] | None) -> None:
        """Send stored events after ``after`` ahead of the live ones held meanwhile (the feed is held)."""
        assert self.feed is not None
        replay = await _events_after(after, devices, settings.GATEWAY["REPLAY_MAX"])
        events: list[WireEvent] = [wire_event(record) for record in replay.events]
        if replay.gap is not None:
            metrics.WS_REPLAY_GAPS.inc()
        self.feed.release(
            replay=events,
            gap=replay.gap,
            replayed_devices=devices,
            # What the client has, as far as it can be true: an ``after`` past the horizon (a hostile or stale
            # client) must not hide events committed later.
            cutoff=max(events[-1]["id"] if events else 0, min(after, replay.horizon)),
        )

    async def _send_subscribed(self) -> None:
        assert self.feed is not None
        await self._send({"type": "subscribed", "devices": "*" if self.feed.wildcard else sorted(self.feed.devices)})


def _request_id_of(text_data: str | None) -> str | None:
    """The request_id of a small JSON frame, if it has one (used to answer refused requests)."""
    if text_data is None or len(text_data) > 4096 or "request_id" not in text_data:
        return None
    try:
        frame = orjson.loads(text_data)
    except orjson.JSONDecodeError:
        return None
    request_id = frame.get("request_id") if isinstance(frame, dict) else None
    return request_id if isinstance(request_id, str) else None


def _devices_field(frame: dict[str, Any]) -> list[str] | None:
    """``"*"`` -> ``None``; otherwise a list of strings (ids with a bad grammar are kept: they are unknown)."""
    devices = frame.get("devices")
    if devices == "*":
        return None
    if not isinstance(devices, list) or not all(isinstance(device, str) for device in devices):
        raise FrameError("bad_frame", 'devices must be "*" or a list of device ids')
    if len(devices) > MAX_DEVICES_PER_FRAME:
        raise FrameError("bad_frame", f"at most {MAX_DEVICES_PER_FRAME} devices per frame, got {len(devices)}")
    return list(dict.fromkeys(devices))


def _after_field(frame: dict[str, Any], *, required: bool) -> int | None:
    after = frame.get("after")
    if after is None and not required:
        return None
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise FrameError("bad_frame", f"after must be a non-negative event id, got {after!r}")
    return after


def _wildcard_devices(access: DeviceAccess) -> set[str] | None:
    return None if access.everything else set(access.viewable)


@db_call
def _access_and_last_id(user: Any) -> tuple[DeviceAccess, int]:
    return access_for(user), selectors.last_event_id()


@db_call
def _visible(access: DeviceAccess, devices: list[str]) -> set[str]:
    return selectors.visible_device_ids(access=access, candidates=[d for d in devices if is_device_id(d)])


_request_command = db_call(commands.request_command)


@db_call
def _command_event(command_id: str, device_id: str) -> EventRecord | None:
    return selectors.command_event(command_id=command_id, device_id=device_id)


@db_call
def _events_after(after: int, devices: set[str] | None, limit: int) -> selectors.Replay:
    return selectors.events_after(after=after, device_ids=devices, limit=limit)
