"""Turns one MQTT message into an ``Observation`` (topic and payload checked), or says why not."""

from __future__ import annotations

import time
from collections.abc import Callable

from devices.records import EventKind, Observation, Reply
from mqtt_bridge.client import InboundMessage
from mqtt_bridge.payloads import PayloadError, parse_event, parse_reply, parse_status, parse_telemetry
from mqtt_bridge.topics import Channel, TopicError, Topics


class DecodeError(ValueError):
    """Why a message was dropped: ``reason`` (metric label), ``device`` (when known) and a description."""

    def __init__(self, reason: str, device: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.device = device


class MessageDecoder:
    def __init__(self, *, topics: Topics, max_payload: int, clock: Callable[[], float] = time.time) -> None:
        self._topics = topics
        self._max_payload = max_payload
        self._clock = clock

    def decode(self, message: InboundMessage) -> Observation | Reply:
        try:
            parsed = self._topics.parse(message.topic)
        except TopicError as exc:
            raise DecodeError(exc.reason, None, str(exc)) from None
        device_id, received_at = parsed.device_id, self._clock()
        try:
            if parsed.channel is Channel.TELEMETRY:
                telemetry = parse_telemetry(message.payload, max_payload=self._max_payload)
                return Observation(
                    device_id=device_id,
                    kind=EventKind.TELEMETRY,
                    received_at=received_at,
                    body={"values": telemetry.values},
                    device_ts=telemetry.device_ts,
                    seq=telemetry.seq,
                )
            if parsed.channel is Channel.REPLIES:
                reply = parse_reply(message.payload, max_payload=self._max_payload)
                return Reply(
                    device_id=device_id,
                    command_id=reply.command_id,
                    ok=reply.ok,
                    received_at=received_at,
                    result=reply.result,
                    error=reply.error,
                )
            if parsed.channel is Channel.STATUS:
                online = parse_status(message.payload, max_payload=self._max_payload)
                return Observation(
                    device_id=device_id,
                    kind=EventKind.STATUS,
                    received_at=received_at,
                    body={"online": online},
                )
            event = parse_event(message.payload, max_payload=self._max_payload)
        except PayloadError as exc:
            raise DecodeError(exc.reason, device_id, str(exc)) from None
        body: dict[str, object] = {"name": event.name, "severity": event.severity}
        if event.message is not None:
            body["message"] = event.message
        if event.data:
            body["data"] = event.data
        return Observation(device_id=device_id, kind=EventKind.EVENT, received_at=received_at, body=body)
