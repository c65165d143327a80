"""The HTTP API for commands (contract sections 2 and 5): plain Django JSON views, kept thin.

What a user may do, and every rule about commands, lives in ``devices`` (services and selectors); these views only
authenticate, parse JSON, call them, and shape the answer. The WebSocket's ``op_command`` does the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from asgiref.sync import async_to_sync
from django.contrib.auth.models import AnonymousUser, User
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt

from devices import selectors, services
from devices.models import Command
from devices.permissions import access_for
from devices.services import CommandRefused
from gateway.announce import announce
from gateway.commands import request_command
from gateway.events import event_frame

COMMANDS_LIST_DEFAULT = 20
COMMANDS_LIST_MAX = 200

View = Callable[..., HttpResponse]


def error(status: int, code: str, message: str = "") -> JsonResponse:
    body = {"error": code, "message": message} if message else {"error": code}
    return JsonResponse(body, status=status)


# Django's CSRF check, run by hand for session-authenticated requests (it logs each refusal with its reason).
_csrf = CsrfViewMiddleware(lambda request: HttpResponse())


def bearer_token(request: HttpRequest) -> str | None:
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credential.strip()
    return None


def api_auth(view: View) -> View:
    """Authenticate by ``Authorization: Bearer <token>`` (CSRF-exempt: a browser never adds it on its own) or by
    the Django session (unsafe methods must pass Django's CSRF check). Anything else gets 401."""

    @csrf_exempt
    @never_cache
    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        token = bearer_token(request)
        if token is not None:
            found = selectors.token_record(token=token) if token else None
            if found is None:
                return error(401, "unauthenticated", "invalid or revoked API token")
            services.touch_token(token_id=found.id)
            request.user = found.user
        elif request.user.is_authenticated:
            # ``view`` itself is not csrf_exempt, so the check runs (it passes safe methods such as GET).
            if _csrf.process_view(request, view, args, kwargs) is not None:
                return error(403, "csrf_failed", "CSRF check failed: send the csrftoken cookie's value as X-CSRFToken")
        else:
            return error(401, "unauthenticated", "log in or send Authorization: Bearer <token>")
        return view(request, *args, **kwargs)

    return wrapped


def _allow(request: HttpRequest, *methods: str) -> JsonResponse | None:
    if request.method in methods:
        return None
    response = error(405, "method_not_allowed", f"use {' or '.join(methods)}")
    response["Allow"] = ", ".join(methods)
    return response


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


def _user(request: HttpRequest) -> User:
    user = request.user
    assert not isinstance(user, AnonymousUser)  # api_auth let the request in
    return user


@api_auth
def commands(request: HttpRequest) -> HttpResponse:
    """``POST /api/commands``: send a command (201), or get back the one with this request_id (200)."""
    if (refused := _allow(request, "POST")) is not None:
        return refused
    try:
        body = orjson.loads(request.body)  # rejects NaN and Infinity, caps nesting
    except orjson.JSONDecodeError as exc:
        return error(400, "bad_request", f"body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return error(400, "bad_request", "body must be a JSON object")
    device, name = body.get("device"), body.get("name")
    if not isinstance(device, str) or not isinstance(name, str):
        return error(400, "bad_request", "a command needs string fields device and name")
    user = _user(request)
    try:
        outcome = request_command(user=user, access=access_for(user), device_id=device, name=name, fields=body)
    except CommandRefused as exc:
        return error(404 if exc.code == "unknown_device" else 400, exc.code, str(exc))
    command = outcome.command
    if outcome.created:
        async_to_sync(announce)(outcome.events, wake_bridges=command.state == Command.State.PENDING)
        last_event = event_frame(outcome.events[-1]) if outcome.events else None
    else:
        last_event = _last_event(command)
    return JsonResponse(
        {"command": command_json(command), "last_event": last_event}, status=201 if outcome.created else 200
    )


@api_auth
def command(request: HttpRequest, command_id: str) -> HttpResponse:
    """``GET /api/commands/<id>``: one command, if its device is viewable, with the last event id it reflects."""
    if (refused := _allow(request, "GET")) is not None:
        return refused
    last_id = selectors.last_event_id()  # before reading state (contract section 4)
    found = selectors.command_detail(access=access_for(request.user), command_id=command_id)
    if found is None:
        return error(404, "unknown_command", f"unknown command {command_id[:100]!r}")
    return JsonResponse({"command": command_json(found), "last_event": _last_event(found), "last_id": last_id})


@api_auth
def device_commands(request: HttpRequest, device_id: str) -> HttpResponse:
    """``GET /api/devices/<id>/commands?limit=N``: a viewable device's commands, newest first."""
    if (refused := _allow(request, "GET")) is not None:
        return refused
    raw = request.GET.get("limit", str(COMMANDS_LIST_DEFAULT))
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= COMMANDS_LIST_MAX:
        return error(400, "bad_request", f"limit must be an integer from 1 to {COMMANDS_LIST_MAX}")
    last_id = selectors.last_event_id()
    if selectors.device_detail(access=access_for(request.user), device_id=device_id) is None:
        return error(404, "unknown_device", f"unknown device {device_id[:100]!r}")
    found = selectors.recent_commands(device_id=device_id, limit=limit)
    return JsonResponse({"commands": [command_json(c) for c in found], "last_id": last_id})
