"""The one module that builds and parses MQTT topics (contract section 1)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from devices.identifiers import is_command_name, is_device_id


class Channel(StrEnum):
    """The last topic level(s) after ``PREFIX/ID``."""

    TELEMETRY = "telemetry"
    STATUS = "status"
    EVENTS = "events"
    REPLIES = "replies"
    COMMANDS = "commands"


INBOUND = (Channel.TELEMETRY, Channel.STATUS, Channel.EVENTS, Channel.REPLIES)


class TopicError(ValueError):
    """A topic outside the contract. ``reason`` is a short metric label."""

    def __init__(self, reason: str, topic: str, detail: str) -> None:
        super().__init__(f"{detail}: {topic!r}")
        self.reason = reason
        self.topic = topic


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    device_id: str
    channel: Channel


def validate_prefix(prefix: str) -> str:
    """A prefix is one or more non-empty levels with no wildcard, NUL or leading ``$``."""
    levels = prefix.split("/")
    if (
        not prefix
        or prefix.startswith("$")
        or any(not level for level in levels)
        or any(char in prefix for char in "+#\x00")
    ):
        raise ValueError(f"invalid topic prefix {prefix!r}: use non-empty levels without + # $ or NUL")
    return prefix


class Topics:
    """Topic builder and parser for one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = validate_prefix(prefix)
        self._levels = len(prefix.split("/"))

    def device(self, device_id: str, channel: Channel) -> str:
        if not is_device_id(device_id):
            raise TopicError("bad_device_id", device_id, "invalid device id")
        return f"{self.prefix}/{device_id}/{channel.value}"

    def command(self, device_id: str, name: str) -> str:
        if not is_command_name(name):
            raise TopicError("bad_command_name", name, "invalid command name")
        return f"{self.device(device_id, Channel.COMMANDS)}/{name}"

    def command_filter(self, device_id: str) -> str:
        """What a device subscribes to for its commands: ``PREFIX/ID/commands/+``."""
        return f"{self.device(device_id, Channel.COMMANDS)}/+"

    def subscriptions(self, shared_group: str | None) -> list[str]:
        """Telemetry, events and replies: through ``$share/GROUP/`` when several bridges split them."""
        share = f"$share/{shared_group}/" if shared_group else ""
        return [
            f"{share}{self.prefix}/+/{Channel.TELEMETRY.value}",
            f"{share}{self.prefix}/+/{Channel.EVENTS.value}",
            f"{share}{self.prefix}/+/{Channel.REPLIES.value}",
        ]

    def status_filter(self) -> str:
        """Status is never shared: retained status is not delivered to shared subscriptions (MQTT 5), and presence
        must survive restarts. With several bridges, only the holder of the status role subscribes to it."""
        return f"{self.prefix}/+/{Channel.STATUS.value}"

    def parse(self, topic: str) -> ParsedTopic:
        """Parse an inbound topic ``PREFIX/ID/CHANNEL``; raise ``TopicError`` naming what is wrong."""
        levels = topic.split("/")
        if len(levels) != self._levels + 2 or "/".join(levels[: self._levels]) != self.prefix:
            raise TopicError("bad_topic", topic, f"topic is not {self.prefix}/ID/<channel>")
        device_id, channel = levels[self._levels], levels[self._levels + 1]
        if not is_device_id(device_id):
            raise TopicError("bad_device_id", topic, "invalid device id in topic")
        try:
            parsed = Channel(channel)
        except ValueError:
            raise TopicError("bad_channel", topic, "unknown channel in topic") from None
        if parsed not in INBOUND:
            raise TopicError("bad_channel", topic, "not an inbound channel")
        return ParsedTopic(device_id=device_id, channel=parsed)


def validate_shared_group(group: str) -> str:
    if not group or any(char in group for char in "/+#\x00"):
        raise ValueError(f"invalid shared subscription group {group!r}: no / + # or NUL")
    return group
