"""Parameters several API operations share, and the one lookup of a device named in a path."""

from __future__ import annotations

from typing import Annotated

from django.http import HttpRequest
from ninja import Path, Query

from devices import selectors
from devices.identifiers import is_device_id
from devices.models import Device
from devices.permissions import access_for
from gateway.api.errors import ApiError
from gateway.api.schemas import DocumentedDeviceId

DeviceId = Annotated[
    DocumentedDeviceId, Path(description="A device id: 1-64 of A-Z a-z 0-9 _ . - (contract section 1).")
]

# Unix seconds. Bounded so that no arithmetic on them overflows and no NaN or infinity reaches a query.
UnixTime = Annotated[float, Query(ge=0, le=1e10, allow_inf_nan=False)]


def device_or_404(request: HttpRequest, device_id: str) -> Device:
    """The device, if it exists and the user may view it; otherwise 404 ``unknown_device`` (one answer for both)."""
    found = None
    if is_device_id(device_id):
        found = selectors.device_detail(access=access_for(request.user), device_id=device_id)
    if found is None:
        raise ApiError(404, "unknown_device", f"unknown device {device_id[:100]!r}")
    return found
