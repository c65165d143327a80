"""Who may see and operate which devices (contract section 6): the one place that decides it.

Superusers see and operate everything; other users see the devices of fleets granted to their groups.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import QuerySet

from devices.models import Device, FleetAccess


@dataclass(frozen=True, slots=True)
class DeviceAccess:
    """A snapshot of one user's access, cheap to check per event."""

    everything: bool
    viewable: frozenset[str] = frozenset()
    operable: frozenset[str] = frozenset()

    def can_view(self, device_id: str) -> bool:
        return self.everything or device_id in self.viewable

    def can_operate(self, device_id: str) -> bool:
        return self.everything or device_id in self.operable

    def filter(self, devices: QuerySet[Device]) -> QuerySet[Device]:
        return devices if self.everything else devices.filter(id__in=self.viewable)


NO_ACCESS = DeviceAccess(everything=False)


def access_for(user: User | AnonymousUser) -> DeviceAccess:
    """Compute ``user``'s access from their groups' fleet grants (one query)."""
    if not user.is_authenticated or not getattr(user, "is_active", False):
        return NO_ACCESS
    if getattr(user, "is_superuser", False):
        return DeviceAccess(everything=True)
    grants = FleetAccess.objects.filter(group__user=user).values_list("fleet__devices__id", "level")
    viewable: set[str] = set()
    operable: set[str] = set()
    for device_id, level in grants:
        if device_id is None:
            continue
        viewable.add(device_id)
        if level == FleetAccess.Level.OPERATE:
            operable.add(device_id)
    return DeviceAccess(everything=False, viewable=frozenset(viewable), operable=frozenset(operable))


def accesses_for(*, user_ids: Collection[int]) -> dict[int, DeviceAccess]:
    """``access_for`` for many users in two queries; users who are gone or inactive are left out."""
    users = User.objects.filter(id__in=list(user_ids), is_active=True).values_list("id", "is_superuser")
    result: dict[int, DeviceAccess] = {}
    ordinary: list[int] = []
    for user_id, is_superuser in users:
        if is_superuser:
            result[user_id] = DeviceAccess(everything=True)
        else:
            ordinary.append(user_id)
    viewable: dict[int, set[str]] = {user_id: set() for user_id in ordinary}
    operable: dict[int, set[str]] = {user_id: set() for user_id in ordinary}
    grants = FleetAccess.objects.filter(group__user__in=ordinary).values_list(
        "group__user", "fleet__devices__id", "level"
    )
    for user_id, device_id, level in grants:
        if device_id is None:
            continue
        viewable[user_id].add(device_id)
        if level == FleetAccess.Level.OPERATE:
            operable[user_id].add(device_id)
    for user_id in ordinary:
        result[user_id] = DeviceAccess(
            everything=False, viewable=frozenset(viewable[user_id]), operable=frozenset(operable[user_id])
        )
    return result
