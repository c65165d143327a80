"""Commands over HTTP (contract sections 2 and 5): send one, read one, list a device's. Thin: every rule about
commands lives in ``devices`` (services and selectors); the WebSocket's ``op_command`` takes the same path."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from asgiref.sync import async_to_sync
from django.http import HttpRequest
from ninja import Path, Query, Router, Status
from ninja.responses import codes_4xx

from devices import selectors
from devices.models import Command
from devices.permissions import access_for
from gateway.announce import announce
from gateway.api import schemas
from gateway.api.auth import current_user
from gateway.api.errors import ApiError
from gateway.api.params import DeviceId, device_or_404
from gateway.commands import request_command
from gateway.events import event_frame

COMMANDS_LIST_DEFAULT = 20
COMMANDS_LIST_MAX = 200

router = Router(tags=["commands"])


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def command_json(command: Command) -> dict[str, Any]:
    user = command.requested_by
    return {
        "id": command.id,
        "device": command.device_id,
        "name": command.name,
        "params": command.params,
        "state": command.state,
        "request_id": command.request_id or None,
        "requested_by": user.get_username() if user is not None else None,
        "created_at": _iso(command.created_at),
        "expires_at": _iso(command.expires_at),
        "sent_at": _iso(command.sent_at),
        "finished_at": _iso(command.finished_at),
        "result": command.result,
        "error": command.error or None,
        "late_reply": command.late_reply,
    }


def _last_event(command: Command) -> dict[str, Any] | None:
    found = selectors.command_event(command_id=command.id, device_id=command.device_id)
    return event_frame(found) if found is not None else None


@router.post("/commands", response={200: schemas.CommandCreated, 201: schemas.CommandCreated, codes_4xx: schemas.Error})
def send_command(request: HttpRequest, body: schemas.CommandRequest) -> Status[dict[str, Any]]:
    """Send a command: 201 when stored (pending, or rejected for the audit trail), 200 when ``request_id`` returned
    an existing command. 404 for a device the user may not see, 400 for a malformed command."""
    user = current_user(request)
    fields = body.model_dump(exclude_unset=True)  # an absent field takes its default; an explicit null is refused
    outcome = request_command(user=user, access=access_for(user), device_id=body.device, name=body.name, fields=fields)
    command = outcome.command
    if outcome.created:
        async_to_sync(announce)(outcome.events, wake_bridges=command.state == Command.State.PENDING)
        last_event = event_frame(outcome.events[-1]) if outcome.events else None
    else:
        last_event = _last_event(command)
    return Status(201 if outcome.created else 200, {"command": command_json(command), "last_event": last_event})


CommandId = Annotated[str, Path(description="A command id, as returned when it was sent.")]
COMMAND_ID = re.compile(r"[0-9a-f]{1,32}")


@router.get("/commands/{command_id}", response={200: schemas.CommandDetail, codes_4xx: schemas.Error})
def get_command(request: HttpRequest, command_id: CommandId) -> dict[str, Any]:
    """One command, if its device is visible, with the last event id it reflects."""
    last_id = selectors.last_event_id()  # before reading state (contract section 4)
    found = None
    if COMMAND_ID.fullmatch(command_id):
        found = selectors.command_detail(access=access_for(request.user), command_id=command_id)
    if found is None:
        raise ApiError(404, "unknown_command", f"unknown command {command_id[:100]!r}")
    return {"command": command_json(found), "last_event": _last_event(found), "last_id": last_id}


@router.get("/devices/{device_id}/commands", response={200: schemas.CommandList, codes_4xx: schemas.Error})
def list_commands(
    request: HttpRequest,
    device_id: DeviceId,
    limit: Annotated[int, Query(ge=1, le=COMMANDS_LIST_MAX)] = COMMANDS_LIST_DEFAULT,
) -> dict[str, Any]:
    """A visible device's commands, newest first."""
    last_id = selectors.last_event_id()
    device = device_or_404(request, device_id)
    found = selectors.recent_commands(device_id=device.id, limit=limit)
    return {"commands": [command_json(c) for c in found], "last_id": last_id}
