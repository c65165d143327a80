"""Builds a ``Bridge`` from Django settings (what the management commands use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

from mqtt_bridge import metrics
from mqtt_bridge.bridge import Bridge, BridgeSettings, BridgeState
from mqtt_bridge.client import MqttClient, MqttConfig


def bridge_from_settings(
    *,
    channel_layer: Any = None,
    protocol: str | None = None,
    on_state: Callable[[BridgeState], None] | None = None,
) -> Bridge:
    """A bridge configured by ``settings.MQTT`` and ``settings.GATEWAY``; ``protocol`` overrides MQTT_PROTOCOL."""
    mqtt: dict[str, Any] = dict(settings.MQTT)
    if protocol is not None:
        mqtt["PROTOCOL"] = protocol
    config = MqttConfig.from_settings(mqtt)
    return Bridge(
        client_factory=lambda: MqttClient(config, on_drop=metrics.QUEUE_DROPPED.inc),
        channel_layer=channel_layer if channel_layer is not None else get_channel_layer(),
        settings=BridgeSettings.from_settings(settings.GATEWAY, mqtt),
        on_state=on_state,
    )
