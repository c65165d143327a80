"""What counts as an alert (contract section 5, issue 6): the one rule, shared by reads and writes.

An alert is a device ``event`` of severity ``warning`` or ``critical`` received within the last ``ALERT_WINDOW``
seconds that no operator has acknowledged. A device with at least one is *alerting*.
"""

from __future__ import annotations

from django.db.models import Exists, OuterRef, QuerySet

from devices.models import Acknowledgement, Event
from devices.records import EventKind

ALERT_SEVERITIES = ("warning", "critical")
ALERT_WINDOW = 3600.0


def alert_events() -> QuerySet[Event]:
    """Every stored warning or critical event, acknowledged or not, of any age."""
    return Event.objects.filter(kind=EventKind.EVENT.value, body__severity__in=ALERT_SEVERITIES)


def not_acknowledged(events: QuerySet[Event]) -> QuerySet[Event]:
    return events.exclude(Exists(Acknowledgement.objects.filter(event_id=OuterRef("id"))))


def unacknowledged_alerts(*, now: float) -> QuerySet[Event]:
    """The alerts at ``now`` (unix seconds): recent enough and not acknowledged."""
    return not_acknowledged(alert_events().filter(ts__gte=now - ALERT_WINDOW))
