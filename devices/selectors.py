"""Reads from the registry and history. Keyword-only and typed; no writes here."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from django.contrib.auth.models import User
from django.db.models import BigIntegerField, Count, Expression, ExpressionWrapper, F, Max, Min, Q, QuerySet, Sum, Value
from django.db.models.expressions import OrderBy
from django.utils import timezone

from devices import rollups
from devices.alerts import unacknowledged_alerts
from devices.expressions import BucketIndex, JsonNumber, group_stats
from devices.identifiers import is_device_id
from devices.models import Acknowledgement, ApiToken, BridgeHeartbeat, Command, Device, Event, Fleet, TelemetryRollup
from devices.permissions import DeviceAccess
from devices.records import EventKind, EventRecord
from devices.services import hash_token


def record_of(event: Event) -> EventRecord:
    return EventRecord(
        id=event.id,
        device_id=event.device_id,
        kind=EventKind(event.kind),
        ts=event.ts,
        body=event.body,
        device_ts=event.device_ts,
    )


def last_event_id() -> int:
    """The highest stored event id (0 when there is none). Read it *before* reading state (contract 4)."""
    return Event.objects.order_by("-id").values_list("id", flat=True).first() or 0


@dataclass(frozen=True, slots=True)
class Replay:
    """Events to resend, oldest first, and the id range that could not be replayed (``None`` if none).

    ``horizon`` is the last id committed before the query: nothing above it can be in ``events`` unless it was
    committed meanwhile, so a client's ``after`` beyond it says nothing about events still to come."""

    events: list[EventRecord]
    gap: tuple[int, int] | None
    horizon: int = 0


def events_after(*, after: int, device_ids: Collection[str] | None, limit: int) -> Replay:
    """The newest ``limit`` events after id ``after`` for those devices (all when ``None``), in id order.

    When more than ``limit`` exist, the oldest are left out and reported as a gap.
    """
    horizon = last_event_id()  # before the query (contract section 4: ids become visible in order)
    events: QuerySet[Event] = Event.objects.filter(id__gt=after)
    if device_ids is not None:
        if not device_ids:
            return Replay(events=[], gap=None, horizon=horizon)
        events = events.filter(device_id__in=list(device_ids))
    newest = list(events.order_by("-id")[: limit + 1])
    newest.reverse()
    gap_end = 0
    if len(newest) > limit:
        dropped = newest.pop(0)
        gap_end = newest[0].id - 1 if newest else dropped.id
    oldest = Event.objects.order_by("id").values_list("id", flat=True).first()
    if oldest is not None and oldest > after + 1:
        # Ids are never reused, so ids between ``after`` and the oldest stored one were purged (retention).
        gap_end = max(gap_end, oldest - 1)
    gap = (after + 1, gap_end) if gap_end > after else None
    return Replay(events=[record_of(event) for event in newest], gap=gap, horizon=horizon)


def events_between(*, after: int, before: int, limit: int) -> list[EventRecord]:
    """The newest ``limit`` events with ``after < id < before``, in id order (every device)."""
    newest = list(Event.objects.filter(id__gt=after, id__lt=before).order_by("-id")[:limit])
    newest.reverse()
    return [record_of(event) for event in newest]


def visible_device_ids(*, access: DeviceAccess, candidates: Collection[str]) -> set[str]:
    """Those of ``candidates`` that exist and ``access`` may view."""
    allowed = [device_id for device_id in candidates if access.can_view(device_id)]
    return set(Device.objects.filter(id__in=allowed).values_list("id", flat=True))


def device_list(*, access: DeviceAccess) -> list[Device]:
    return list(access.filter(Device.objects.all()).order_by("id"))


def device_detail(*, access: DeviceAccess, device_id: str) -> Device | None:
    if not access.can_view(device_id):
        return None
    return Device.objects.filter(id=device_id).first()


def recent_events(*, device_id: str, limit: int = 50, kinds: Collection[EventKind] | None = None) -> list[EventRecord]:
    events = Event.objects.filter(device_id=device_id)
    if kinds is not None:
        events = events.filter(kind__in=[kind.value for kind in kinds])
    rows = list(events.order_by("-id")[:limit])
    return [record_of(row) for row in rows]


def user_for_token(*, token: str) -> User | None:
    """The active user an unrevoked API token belongs to, or ``None``."""
    found = token_record(token=token)
    return found.user if found is not None else None


def token_record(*, token: str) -> ApiToken | None:
    """The unrevoked token row (with its active user) for a presented token, or ``None``."""
    return (
        ApiToken.objects.select_related("user")
        .filter(key_hash=hash_token(token), revoked_at__isnull=True, user__is_active=True)
        .first()
    )


def valid_token_ids(*, token_ids: Collection[int]) -> set[int]:
    """Those of ``token_ids`` that are neither revoked nor owned by an inactive user."""
    return set(
        ApiToken.objects.filter(id__in=list(token_ids), revoked_at__isnull=True, user__is_active=True).values_list(
            "id", flat=True
        )
    )


@dataclass(frozen=True, slots=True)
class BridgeHealth:
    connected: list[str]
    stale_or_disconnected: list[str]
    waiting: dict[str, str] = field(default_factory=dict)
    """Bridges that reported within the age limit without a broker connection -> what they said (why)."""

    @property
    def ok(self) -> bool:
        return bool(self.connected)


def bridge_health(*, max_age: float) -> BridgeHealth:
    """Which bridges reported a live broker connection within ``max_age`` seconds (and what the others said)."""
    fresh_after = timezone.now() - timedelta(seconds=max_age)
    connected: list[str] = []
    other: list[str] = []
    waiting: dict[str, str] = {}
    for beat in BridgeHeartbeat.objects.order_by("name"):
        fresh = beat.updated_at >= fresh_after
        (connected if beat.connected and fresh else other).append(beat.name)
        if fresh and not beat.connected:
            waiting[beat.name] = beat.detail or "not connected"
    return BridgeHealth(connected=connected, stale_or_disconnected=other, waiting=waiting)


def command_event(*, command_id: str, device_id: str) -> EventRecord | None:
    """The latest stored state change of a command (what a repeated request_id gets back)."""
    row = (
        Event.objects.filter(device_id=device_id, kind=EventKind.COMMAND.value, body__command_id=command_id)
        .order_by("-id")
        .first()
    )
    return record_of(row) if row is not None else None


def recent_commands(*, device_id: str, limit: int = 20) -> list[Command]:
    return list(
        Command.objects.filter(device_id=device_id).select_related("requested_by").order_by("-created_at")[:limit]
    )


def command_detail(*, access: DeviceAccess, command_id: str) -> Command | None:
    command = Command.objects.filter(id=command_id).select_related("requested_by").first()
    if command is None or not access.can_view(command.device_id):
        return None
    return command


# --- The HTTP API's reads (issue 6): device lists with counts and alerts, history, acknowledgements ----------------

DEVICE_SORTS: dict[str, tuple[OrderBy | str, ...]] = {
    "id": ("id",),
    "-id": ("-id",),
    "name": ("name", "id"),
    "-name": ("-name", "-id"),
    "last_seen": (F("last_seen").asc(nulls_first=True), "id"),
    "-last_seen": (F("last_seen").desc(nulls_last=True), "-id"),
}


@dataclass(frozen=True, slots=True)
class DeviceFilters:
    """Which devices a list shows; ``None`` (or an empty string) leaves that filter out. ``q`` is a
    case-insensitive substring of the id or the name; ``fleet`` a fleet's name; ``alerting`` whether the device
    has an alert now."""

    online: bool | None = None
    kind: str | None = None
    fleet: str | None = None
    q: str | None = None
    alerting: bool | None = None

    @property
    def empty(self) -> bool:
        return self.online is None and self.alerting is None and not (self.kind or self.fleet or self.q)


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """A device with what the lists show beside its own fields: its fleets' names and its alert count."""

    device: Device
    fleets: list[str]
    alerts: int


@dataclass(frozen=True, slots=True)
class DeviceCounts:
    online: int
    offline: int
    alerting: int


@dataclass(frozen=True, slots=True)
class DevicePage:
    """One page of a filtered, sorted list; ``total`` counts every match, ``counts`` every visible device."""

    devices: list[DeviceSummary]
    total: int
    counts: DeviceCounts


def alert_counts(*, access: DeviceAccess, now: float) -> dict[str, int]:
    """How many alerts each visible device has at ``now`` (devices without any are left out)."""
    # Counted here rather than by GROUP BY: grouping makes SQLite walk the (device, ts) index over all history
    # instead of the alert index over the last hour; alerts are few, and only their device ids are read.
    rows = unacknowledged_alerts(now=now).order_by().values_list("device_id", flat=True)
    return {device_id: n for device_id, n in Counter(rows).items() if access.can_view(device_id)}


def device_page(
    *, access: DeviceAccess, filters: DeviceFilters, sort: str, offset: int, limit: int, now: float
) -> DevicePage:
    """Visible devices matching ``filters``, sorted by ``sort`` (a key of ``DEVICE_SORTS``), ``limit`` of them
    from ``offset``; with the total match count and the online, offline and alerting counts of all visible ones."""
    visible = access.filter(Device.objects.all())
    alerts = alert_counts(access=access, now=now)
    tally = visible.aggregate(all=Count("id"), online=Count("id", filter=Q(online=True)))
    counts = DeviceCounts(online=tally["online"], offline=tally["all"] - tally["online"], alerting=len(alerts))
    matching = _filtered(visible, filters, alerting=alerts.keys())
    rows = list(matching.order_by(*DEVICE_SORTS[sort]).prefetch_related("fleets")[offset : offset + limit])
    summaries = [_summary(device, alerts.get(device.id, 0)) for device in rows]
    return DevicePage(
        devices=summaries, total=_total(matching, filters, rows, offset, limit, tally["all"]), counts=counts
    )


def _total(
    matching: QuerySet[Device], filters: DeviceFilters, rows: list[Device], offset: int, limit: int, visible: int
) -> int:
    """How many devices match, without a COUNT when the page or the filters already say it (each query with a
    user's granted ids costs Django ~10 ms to compile at 5,000 devices)."""
    if filters.empty:
        return visible
    if len(rows) < limit and (rows or offset == 0):
        return offset + len(rows)  # the last page
    return matching.count()


def _filtered(devices: QuerySet[Device], filters: DeviceFilters, *, alerting: Collection[str]) -> QuerySet[Device]:
    if filters.online is not None:
        devices = devices.filter(online=filters.online)
    if filters.kind:
        devices = devices.filter(kind=filters.kind)
    if filters.fleet:
        devices = devices.filter(fleets__name=filters.fleet)
    if filters.q:
        devices = devices.filter(Q(id__icontains=filters.q) | Q(name__icontains=filters.q))
    if filters.alerting is not None:
        with_alerts = Q(id__in=list(alerting))
        devices = devices.filter(with_alerts if filters.alerting else ~with_alerts)
    return devices


def _summary(device: Device, alerts: int) -> DeviceSummary:
    return DeviceSummary(device=device, fleets=sorted(fleet.name for fleet in device.fleets.all()), alerts=alerts)


def device_summaries(*, access: DeviceAccess, device_ids: Sequence[str], now: float) -> list[DeviceSummary]:
    """The visible ones of ``device_ids`` (in that order, unknown ones left out) with their fleets and alert
    counts, in three queries however many there are."""
    wanted = [device_id for device_id in dict.fromkeys(device_ids) if is_device_id(device_id)]
    wanted = [device_id for device_id in wanted if access.can_view(device_id)]
    found = {device.id: device for device in Device.objects.filter(id__in=wanted).prefetch_related("fleets")}
    alerts = alert_counts(access=access, now=now) if found else {}
    return [_summary(found[device_id], alerts.get(device_id, 0)) for device_id in wanted if device_id in found]


def device_summary(*, access: DeviceAccess, device_id: str, now: float) -> DeviceSummary | None:
    """One visible device with its fleets and alert count; ``None`` if unknown or not visible."""
    found = device_summaries(access=access, device_ids=[device_id], now=now)
    return found[0] if found else None


@dataclass(frozen=True, slots=True)
class Series:
    """One metric over a time range: raw points (``bucket`` None: ``t`` is each event's time, min = max = mean =
    the value, count 1) or per-bucket aggregates (``t`` is each bucket's start; buckets without data left out)."""

    bucket: float | None
    t: list[float] = field(default_factory=list)
    min: list[float] = field(default_factory=list)
    max: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)


def telemetry_series(
    *, device_id: str, metrics: Sequence[str], start: float, end: float, buckets: int
) -> dict[str, Series]:
    """The numeric values of ``metrics`` in a device's telemetry with ``start <= ts <= end``.

    A metric with at most ``buckets`` values in the range comes back raw; one with more, as min, max, mean and
    count per bucket of width ``(end - start) / buckets``, or, when that is an hour or more, per bucket of that
    width rounded up to whole hours and counted from the hour ``start`` falls in (see ``_hourly``). Both are
    computed by the database; non-numeric values are skipped.
    """
    rows = Event.objects.filter(device_id=device_id, kind=EventKind.TELEMETRY.value, ts__gte=start, ts__lte=end)
    width = (end - start) / buckets
    if width >= rollups.HOUR:
        series = _hourly(device_id, metrics, start=start, end=end, hours=math.ceil(width / rollups.HOUR))
    else:
        series = _bucketed(rows, metrics, start=start, end=end, buckets=buckets, width=width)
    few = [metric for metric in metrics if sum(series[metric].count) <= buckets]
    series.update(_raw(rows, few))
    return series


def _metric_values(metrics: Sequence[str]) -> dict[str, Expression]:
    """Each metric's number in a telemetry body, named ``v0``, ``v1``, ... in the order of ``metrics``."""
    return {f"v{n}": JsonNumber("body", ("values", metric)) for n, metric in enumerate(metrics)}


def _bucketed(
    rows: QuerySet[Event], metrics: Sequence[str], *, start: float, end: float, buckets: int, width: float
) -> dict[str, Series]:
    stats = group_stats(
        rows,
        group=BucketIndex("ts", start=start, end=end, buckets=buckets),
        values=_metric_values(metrics),
    )
    series = {metric: Series(bucket=width) for metric in metrics}
    for bucket, *values in stats:
        for n, metric in enumerate(metrics):
            low, high, mean, count = values[4 * n : 4 * n + 4]
            if count:
                found = series[metric]
                found.t.append(start + bucket * width)
                found.min.append(low)
                found.max.append(high)
                found.mean.append(mean)
                found.count.append(count)
    return series


def _hourly(device_id: str, metrics: Sequence[str], *, start: float, end: float, hours: int) -> dict[str, Series]:
    """Buckets of ``hours`` whole hours, the first starting at the hour ``start`` falls in: the hours wholly inside
    the range read from the hourly rollups (a row per hour and metric, whatever the rate), the two partial hours at
    its edges from the events, so the figures are exactly those of the events in ``[start, end]``. The first
    bucket's ``t`` is ``start``."""
    first, last = rollups.hour_of(start), rollups.hour_of(end)
    stats: dict[tuple[str, int], rollups.Stats] = {}
    bucket = ExpressionWrapper((F("hour") - first) / hours, output_field=BigIntegerField())
    inside = (
        TelemetryRollup.objects.filter(device_id=device_id, metric__in=list(metrics), hour__gt=first, hour__lt=last)
        .annotate(bucket=bucket)
        .values("metric", "bucket")
        .annotate(low=Min("min"), high=Max("max"), total=Sum("total"), values=Sum("count"))
        .order_by()
    )
    for row in inside:
        stats[(row["metric"], row["bucket"])] = rollups.Stats(row["low"], row["high"], row["total"], row["values"])
    # Each edge with one lower and one upper bound: given both the range's and the edge's, SQLite's planner may pick
    # the range's for the index search and scan the whole range (45 ms per edge over a year of minutes).
    telemetry = Event.objects.filter(device_id=device_id, kind=EventKind.TELEMETRY.value)
    edges = (
        (telemetry.filter(ts__gte=start, ts__lt=(first + 1) * rollups.HOUR), 0),
        (telemetry.filter(ts__gte=last * rollups.HOUR, ts__lte=end), (last - first) // hours),
    )
    values = _metric_values(metrics)
    for edge, index in edges:
        for _, *figures in group_stats(edge, group=Value(0), values=values):
            for n, metric in enumerate(metrics):
                low, high, mean, count = figures[4 * n : 4 * n + 4]
                if count:
                    edge_stats = rollups.Stats(low, high, mean * count, count)
                    found = stats.setdefault((metric, index), edge_stats)
                    if found is not edge_stats:
                        found.merge(edge_stats)
    width = hours * rollups.HOUR
    series = {metric: Series(bucket=width) for metric in metrics}
    for (metric, index), found in sorted(stats.items()):
        out = series[metric]
        out.t.append(max(start, (first + index * hours) * rollups.HOUR))
        out.min.append(found.min)
        out.max.append(found.max)
        out.mean.append(found.total / found.count)
        out.count.append(found.count)
    return series


def _raw(rows: QuerySet[Event], metrics: Sequence[str]) -> dict[str, Series]:
    if not metrics:
        return {}
    values = _metric_values(metrics)
    present = Q()
    for name in values:
        present |= Q(**{f"{name}__isnull": False})
    series = {metric: Series(bucket=None) for metric in metrics}
    for row in rows.annotate(**values).filter(present).order_by("ts", "id").values("ts", *values):
        for n, metric in enumerate(metrics):
            value = row[f"v{n}"]
            if value is not None:
                found = series[metric]
                found.t.append(row["ts"])
                found.min.append(value)
                found.max.append(value)
                found.mean.append(value)
                found.count.append(1)
    return series


def device_events(
    *,
    device_id: str,
    start: float | None = None,
    end: float | None = None,
    severities: Collection[str] | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[EventRecord]:
    """A device's ``event`` kind events (name, severity), newest first; ``before`` pages by id."""
    rows = Event.objects.filter(device_id=device_id, kind=EventKind.EVENT.value)
    if start is not None:
        rows = rows.filter(ts__gte=start)
    if end is not None:
        rows = rows.filter(ts__lte=end)
    if severities is not None:
        rows = rows.filter(body__severity__in=list(severities))
    if before is not None:
        rows = rows.filter(id__lt=before)
    return [record_of(row) for row in rows.order_by("-id")[:limit]]


@dataclass(frozen=True, slots=True)
class AcknowledgementRecord:
    event_id: int
    by: str | None
    at: float


def acknowledgements(*, event_ids: Collection[int]) -> dict[int, AcknowledgementRecord]:
    """Who acknowledged which of ``event_ids``, and when (events never acknowledged are left out)."""
    rows = Acknowledgement.objects.filter(event_id__in=list(event_ids)).select_related("acknowledged_by")
    return {
        row.event_id: AcknowledgementRecord(
            event_id=row.event_id,
            by=row.acknowledged_by.get_username() if row.acknowledged_by is not None else None,
            at=row.acknowledged_at.timestamp(),
        )
        for row in rows
    }


def latest_command_events(*, device_id: str, limit: int = 20) -> list[EventRecord]:
    """The latest stored state of each of a device's ``limit`` most recent commands, newest command first
    (commands without a stored event are left out). Two queries, whatever ``limit`` is."""
    command_ids = list(
        Command.objects.filter(device_id=device_id).order_by("-created_at").values_list("id", flat=True)[:limit]
    )
    latest: dict[str, Event] = {}
    states = Event.objects.filter(
        device_id=device_id, kind=EventKind.COMMAND.value, body__command_id__in=command_ids
    ).order_by("-id")
    for row in states:
        latest.setdefault(row.body["command_id"], row)
    return [record_of(latest[command_id]) for command_id in command_ids if command_id in latest]


@dataclass(frozen=True, slots=True)
class DeviceFacets:
    """The values the fleet page offers as filters: kinds of visible devices, and fleets holding any of them."""

    kinds: list[str]
    fleets: list[str]


def device_facets(*, access: DeviceAccess) -> DeviceFacets:
    """Distinct non-empty kinds of the visible devices and names of the fleets they belong to, sorted (two queries)."""
    visible = access.filter(Device.objects.all())
    kinds = visible.exclude(kind="").order_by("kind").values_list("kind", flat=True).distinct()
    fleets = Fleet.objects.filter(devices__in=visible).order_by("name").values_list("name", flat=True).distinct()
    return DeviceFacets(kinds=list(kinds), fleets=list(fleets))
