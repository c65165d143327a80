"""Devices over HTTP (contract section 5, issue 6): lists with filters and counts, one device, deletion, telemetry
history downsampled by the database, device events, and acknowledging alerts. Thin views over ``devices``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Annotated, Any, Literal

from django.http import HttpRequest
from ninja import Query, Router, Status
from ninja.responses import codes_4xx

from devices import selectors, services
from devices.permissions import access_for
from devices.records import EventRecord
from devices.selectors import DeviceFilters, DeviceSummary
from gateway.api import schemas
from gateway.api.auth import current_user
from gateway.api.errors import ApiError
from gateway.api.params import DeviceId, UnixTime, device_or_404
from gateway.events import event_frame
from gateway.views import device_state

router = Router(tags=["devices"])

LIST_DEFAULT, LIST_MAX = 100, 1000
EVENTS_DEFAULT, EVENTS_MAX = 100, 1000
DETAIL_EVENTS, DETAIL_COMMANDS = 50, 20
BUCKETS_DEFAULT, BUCKETS_MAX = 300, 2000
METRICS_MAX = 20
DEFAULT_RANGE = 3600.0
SEVERITIES = ("info", "warning", "critical")

# Free text from a query string: bounded, and without NUL (PostgreSQL refuses it in any string).
Text = Annotated[str, Query(max_length=200, pattern=r"^[^\x00]*$")]
# At most METRICS_MAX names of at most 128 characters, without NUL (metric names with a comma cannot be asked for).
METRICS_PATTERN = rf"^[^,\x00]{{0,128}}(,[^,\x00]{{0,128}}){{0,{METRICS_MAX - 1}}}$"
SEVERITY_PATTERN = rf"^({'|'.join(SEVERITIES)})(,({'|'.join(SEVERITIES)}))*$"
Sort = Literal["id", "-id", "name", "-name", "last_seen", "-last_seen"]


def device_json(summary: DeviceSummary) -> dict[str, Any]:
    device = summary.device
    changed = device.status_changed_at
    return {
        **device_state(device),
        "status_changed_at": changed.timestamp() if changed is not None else None,
        "fleets": summary.fleets,
        "alerting": summary.alerts > 0,
        "alerts": summary.alerts,
    }


def _summary_or_404(request: HttpRequest, device_id: str) -> DeviceSummary:
    found = selectors.device_summary(access=access_for(request.user), device_id=device_id, now=time.time())
    if found is None:
        raise ApiError(404, "unknown_device", f"unknown device {device_id[:100]!r}")
    return found


@router.get("/devices", response={200: schemas.DeviceList, codes_4xx: schemas.Error})
def list_devices(
    request: HttpRequest,
    online: bool | None = None,
    kind: Text | None = None,
    fleet: Text | None = None,
    q: Annotated[Text | None, Query(description="Case-insensitive substring of the id or the name.")] = None,
    alerting: bool | None = None,
    sort: Sort = "id",
    limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = LIST_DEFAULT,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> dict[str, Any]:
    """The devices the user may see, filtered and sorted, one page of them; ``total`` counts every match and
    ``counts`` every visible device whatever the filters."""
    last_id = selectors.last_event_id()  # before reading state (contract section 4)
    filters = DeviceFilters(online=online, kind=kind, fleet=fleet, q=q, alerting=alerting)
    page = selectors.device_page(
        access=access_for(request.user), filters=filters, sort=sort, offset=offset, limit=limit, now=time.time()
    )
    counts = page.counts
    return {
        "devices": [device_json(summary) for summary in page.devices],
        "total": page.total,
        "counts": {"online": counts.online, "offline": counts.offline, "alerting": counts.alerting},
        "last_id": last_id,
    }


@router.get("/devices/{device_id}", response={200: schemas.DeviceDetail, codes_4xx: schemas.Error})
def get_device(request: HttpRequest, device_id: DeviceId) -> dict[str, Any]:
    """One device with its latest values, its newest events of every kind and its recent commands' states."""
    last_id = selectors.last_event_id()
    summary = _summary_or_404(request, device_id)
    events = selectors.recent_events(device_id=summary.device.id, limit=DETAIL_EVENTS)
    commands = selectors.latest_command_events(device_id=summary.device.id, limit=DETAIL_COMMANDS)
    return {
        "device": device_json(summary),
        "events": _frames(events),
        "commands": [event_frame(record) for record in commands],
        "last_id": last_id,
    }


@router.delete("/devices/{device_id}", response={204: None, codes_4xx: schemas.Error})
def delete_device(request: HttpRequest, device_id: DeviceId) -> Status[None]:
    """Delete a device with its history, commands and acknowledgements (operate permission)."""
    services.delete_device(access=access_for(request.user), device_id=device_id)
    return Status(204, None)


@router.get("/devices/{device_id}/telemetry", response={200: schemas.Telemetry, codes_4xx: schemas.Error})
def telemetry(
    request: HttpRequest,
    device_id: DeviceId,
    metrics: Annotated[
        str | None,
        Query(
            pattern=METRICS_PATTERN,
            description=f"Up to {METRICS_MAX} comma-separated metric names (default: the device's numeric metrics).",
        ),
    ] = None,
    start: Annotated[UnixTime | None, Query(description="Default: end - 3600.")] = None,
    end: Annotated[UnixTime | None, Query(description="Default: now.")] = None,
    buckets: Annotated[int, Query(ge=1, le=BUCKETS_MAX)] = BUCKETS_DEFAULT,
) -> dict[str, Any]:
    """Numeric telemetry over ``[start, end]``: raw points for a metric with at most ``buckets`` values in the
    range, otherwise min, max, mean and count per bucket of width ``(end - start) / buckets``, rounded up to whole
    hours when it is an hour or more (buckets without data left out), computed by the database from the events or,
    for whole hours, from hourly rollups. Booleans and strings are not charted."""
    last_id = selectors.last_event_id()
    device = device_or_404(request, device_id)
    until = end if end is not None else time.time()
    since = start if start is not None else max(0.0, until - DEFAULT_RANGE)
    if since >= until:
        raise ApiError(400, "bad_request", f"start ({since}) must be before end ({until})")
    names = list(dict.fromkeys(name for name in (metrics or "").split(",") if name)) or _numeric_metrics(device.latest)
    series = selectors.telemetry_series(device_id=device.id, metrics=names, start=since, end=until, buckets=buckets)
    widths = [found.bucket for found in series.values() if found.bucket is not None]
    return {
        "device": device.id,
        "start": since,
        "end": until,
        "bucket": widths[0] if widths else None,
        "series": {name: asdict(found) for name, found in series.items()},
        "last_id": last_id,
    }


def _numeric_metrics(latest: dict[str, Any]) -> list[str]:
    numeric = [name for name, value in latest.items() if isinstance(value, int | float) and not isinstance(value, bool)]
    return sorted(numeric)[:METRICS_MAX]


@router.get("/devices/{device_id}/events", response={200: schemas.Events, codes_4xx: schemas.Error})
def device_events(
    request: HttpRequest,
    device_id: DeviceId,
    start: UnixTime | None = None,
    end: UnixTime | None = None,
    severity: Annotated[
        str | None, Query(pattern=SEVERITY_PATTERN, description="Comma-separated: info, warning, critical.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=EVENTS_MAX)] = EVENTS_DEFAULT,
    before: Annotated[schemas.BigId | None, Query(description="Only events with a smaller id (paging).")] = None,
) -> dict[str, Any]:
    """A device's ``event`` frames (name, severity), newest first, each with who acknowledged it."""
    last_id = selectors.last_event_id()
    device = device_or_404(request, device_id)
    severities = severity.split(",") if severity is not None else None
    found = selectors.device_events(
        device_id=device.id, start=start, end=end, severities=severities, before=before, limit=limit
    )
    return {"events": _frames(found), "last_id": last_id}


def _frames(records: Sequence[EventRecord]) -> list[dict[str, Any]]:
    """Event frames; those of kind ``event`` also say who acknowledged them and when (or null)."""
    acknowledged = selectors.acknowledgements(event_ids=[r.id for r in records if r.kind == "event"])
    frames = []
    for record in records:
        frame = event_frame(record)
        if record.kind == "event":
            ack = acknowledged.get(record.id)
            frame["acknowledged"] = {"by": ack.by, "at": ack.at} if ack is not None else None
        frames.append(frame)
    return frames


@router.post("/devices/{device_id}/alerts/ack", response={200: schemas.Ack, codes_4xx: schemas.Error})
def acknowledge_device(
    request: HttpRequest, device_id: DeviceId, body: schemas.AckRequest | None = None
) -> dict[str, Any]:
    """Acknowledge the device's current alerts (operate permission), or only ``event_ids``; who and when are
    stored. The body may be left out. Returns how many were acknowledged now and the device as it is after."""
    user = current_user(request)
    now = time.time()
    count = services.acknowledge_alerts(
        user=user, access=access_for(user), device_ids=[device_id], event_ids=body.event_ids if body else None, now=now
    )
    return {"acknowledged": count, "device": device_json(_summary_or_404(request, device_id))}


@router.post("/alerts/ack", response={200: schemas.AlertsAck, codes_4xx: schemas.Error})
def acknowledge_devices(request: HttpRequest, body: schemas.AlertsAckRequest) -> dict[str, Any]:
    """Acknowledge the current alerts of several devices at once; all must be operable, or nothing is done."""
    user = current_user(request)
    access = access_for(user)
    now = time.time()
    count = services.acknowledge_alerts(user=user, access=access, device_ids=body.devices, event_ids=None, now=now)
    summaries = selectors.device_summaries(access=access, device_ids=body.devices, now=now)
    return {"acknowledged": count, "devices": [device_json(summary) for summary in summaries]}
