"""Shared by the API tests: users with fleet grants, clients that authenticate, and stored history."""

from __future__ import annotations

import time

from django.contrib.auth.models import Group, User
from django.test import Client

from devices import services
from devices.models import Device, Fleet, FleetAccess
from devices.records import EventKind, Observation


def grant(user: User, *, level: str, device_ids: list[str]) -> None:
    """Give ``user`` ``level`` (view or operate) on these devices, through a fleet and a group of their own."""
    group = Group.objects.create(name=f"{user.username}-{level}")
    fleet = Fleet.objects.create(name=f"{user.username}-{level}-fleet")
    fleet.devices.add(*Device.objects.filter(id__in=device_ids))
    FleetAccess.objects.create(fleet=fleet, group=group, level=level)
    user.groups.add(group)


def token_client(user: User) -> Client:
    """A client that sends a new API token of ``user`` on every request."""
    client = Client()
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {services.issue_token(user=user, name='tests')}"
    return client


def store(device: str, kind: EventKind, body: dict, *, at: float | None = None) -> int:
    """Store one event through ingest (auto-registering the device); returns its id."""
    observation = Observation(device_id=device, kind=kind, received_at=time.time() if at is None else at, body=body)
    return services.ingest(observations=[observation], auto_register=True, max_devices=10_000).stored[0].id


def alert(device: str, severity: str = "warning", *, age: float = 0.0, name: str = "overheat") -> int:
    return store(device, EventKind.EVENT, {"name": name, "severity": severity}, at=time.time() - age)


def telemetry(device: str, values: dict, *, at: float | None = None) -> int:
    return store(device, EventKind.TELEMETRY, {"values": values}, at=at)
