"""How the web side takes a command request, whichever door it came through (WebSocket or HTTP API)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.models import User

from devices import services
from devices.permissions import DeviceAccess
from devices.services import CommandOutcome
from gateway import metrics


def request_command(
    *, user: User, access: DeviceAccess, device_id: str, name: str, fields: dict[str, Any]
) -> CommandOutcome:
    """Store the request under the configured policy (``CommandRefused`` propagates) and count the outcome.

    ``fields`` is the client's frame or body: ``params``, ``request_id`` and ``timeout`` are read from it.
    """
    conf = settings.GATEWAY
    try:
        outcome = services.request_command(
            user=user,
            access=access,
            device_id=device_id,
            name=name,
            params=fields.get("params", {}),
            request_id=fields.get("request_id"),
            timeout=fields.get("timeout", conf["COMMAND_TIMEOUT"]),
            offline_policy=conf["COMMANDS_OFFLINE"],
            max_payload=conf["MAX_PAYLOAD"],
            commands_per_minute=conf["COMMANDS_PER_MINUTE"],
        )
    except services.CommandRefused:
        metrics.COMMANDS_REQUESTED.labels("refused").inc()
        raise
    metrics.COMMANDS_REQUESTED.labels(outcome.command.state if outcome.created else "repeated").inc()
    return outcome
