"""Console pages and operational endpoints. Thin: the devices app decides what a user may see."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from devices import selectors
from devices.models import Device
from devices.permissions import access_for
from gateway import metrics as _web_metrics  # noqa: F401  (registers the web side's metrics with /metrics)
from gateway.events import event_frame
from gateway.health import readiness

DEVICE_PAGE_EVENTS = 50
DEVICE_PAGE_COMMANDS = 20


def device_state(device: Device) -> dict[str, Any]:
    """The JSON the console starts from (and reloads after a gap)."""
    return {
        "id": device.id,
        "name": device.name,
        "kind": device.kind,
        "online": device.online,
        "last_seen": device.last_seen.timestamp() if device.last_seen else None,
        "latest": device.latest,
        "latest_ts": device.latest_ts,
    }


@login_required
def fleet(request: HttpRequest) -> HttpResponse:
    """The fleet page: a shell with the filters' choices; the devices come from ``/api/devices``, page by page."""
    facets = selectors.device_facets(access=access_for(request.user))
    return render(request, "gateway/fleet.html", {"kinds": facets.kinds, "fleets": facets.fleets})


@login_required
def device(request: HttpRequest, device_id: str) -> HttpResponse:
    """The device page, with the state it starts from (device, newest events, recent commands) and its last_id."""
    last_id = selectors.last_event_id()  # before reading state (contract section 4)
    found = selectors.device_detail(access=access_for(request.user), device_id=device_id)
    if found is None:
        raise Http404("No such device")
    events = selectors.recent_events(device_id=found.id, limit=DEVICE_PAGE_EVENTS)
    commands = selectors.latest_command_events(device_id=found.id, limit=DEVICE_PAGE_COMMANDS)
    state = {
        "last_id": last_id,
        "device": device_state(found),
        "events": [event_frame(record) for record in events],
        "commands": [event_frame(record) for record in commands],
    }
    return render(request, "gateway/device.html", {"device": found, "state": state})


@login_required
@never_cache
def state(request: HttpRequest) -> JsonResponse:
    """Current state of every visible device, with the last event id it reflects."""
    last_id = selectors.last_event_id()
    devices = selectors.device_list(access=access_for(request.user))
    return JsonResponse({"last_id": last_id, "devices": [device_state(d) for d in devices]})


@never_cache
def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")


@never_cache
async def readyz(request: HttpRequest) -> JsonResponse:
    checks = await readiness()
    ready = all(check.ok for check in checks)
    body = {"ready": ready, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
    return JsonResponse(body, status=200 if ready else 503)


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """This process's metrics: the web side's, and the bridge's too when it runs in the same process."""
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
