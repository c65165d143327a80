"""The registry, the event history and access grants: the gateway's source of truth."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import models
from django.db.models import Q

from devices.records import EventKind


class Device(models.Model):
    id = models.CharField(primary_key=True, max_length=64)
    name = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=100, blank=True)
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    online = models.BooleanField(default=False)
    status_changed_at = models.DateTimeField(null=True, blank=True)
    latest = models.JSONField(default=dict, blank=True, help_text="Latest value of each metric.")
    latest_ts = models.FloatField(null=True, blank=True, help_text="Receive time of the latest telemetry.")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name or self.id


class Event(models.Model):
    """One stored device event. ``id`` orders history; ``ts`` is the gateway's receive time."""

    id = models.BigAutoField(primary_key=True)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=16, choices=[(k.value, k.value) for k in EventKind])
    ts = models.FloatField()
    device_ts = models.FloatField(null=True, blank=True)
    seq = models.BigIntegerField(null=True, blank=True)
    body = models.JSONField(default=dict)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["device", "id"], name="event_device_id"),
            models.Index(fields=["device", "ts"], name="event_device_ts"),
            models.Index(fields=["ts"], name="event_ts"),
            # Alerts (devices/alerts.py) are recent events of kind "event": a small partial index finds them
            # without scanning the last hour's telemetry, and costs nothing when telemetry is stored.
            models.Index(fields=["ts"], condition=Q(kind="event"), name="event_alert_ts"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["device", "seq"], condition=Q(seq__isnull=False), name="event_unique_device_seq"
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.id} from {self.device_id}"


class Fleet(models.Model):
    """A set of devices; access to them is granted to Django groups."""

    name = models.CharField(max_length=100, unique=True)
    devices = models.ManyToManyField(Device, related_name="fleets", blank=True)

    def __str__(self) -> str:
        return self.name


class FleetAccess(models.Model):
    class Level(models.TextChoices):
        VIEW = "view"
        OPERATE = "operate"

    fleet = models.ForeignKey(Fleet, on_delete=models.CASCADE, related_name="grants")
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="fleet_grants")
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.VIEW)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["fleet", "group"], name="fleet_access_unique")]
        verbose_name_plural = "fleet access"

    def __str__(self) -> str:
        return f"{self.group} may {self.level} {self.fleet}"


class ApiToken(models.Model):
    """A bearer token for scripts. Only its SHA-256 is stored; the token itself is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=8, help_text="First characters of the token, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True)
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"


class BridgeHeartbeat(models.Model):
    """What each bridge last said about its broker connection, so a web-only process can report readiness."""

    name = models.CharField(primary_key=True, max_length=200)
    connected = models.BooleanField(default=False)
    detail = models.CharField(max_length=300, blank=True)
    updated_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name}: {'connected' if self.connected else 'disconnected'}"


class Command(models.Model):
    """An operator's command to a device. The table is the queue: a bridge claims a row with a lease, publishes
    it, and records each state change; every command ends in exactly one final state."""

    class State(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        EXPIRED = "expired"
        REJECTED = "rejected"

    FINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.EXPIRED, State.REJECTED})

    id = models.CharField(primary_key=True, max_length=32, editable=False)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="commands")
    name = models.CharField(max_length=64)
    params = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="commands"
    )
    request_id = models.CharField(max_length=100, blank=True, help_text="The client's idempotency key, if any.")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(help_text="Wall-clock deadline, for display and for bridges that restart.")
    timeout = models.FloatField(help_text="Seconds the command may take, from creation.")
    sent_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="Publishes started (a crash may leave one unknown).")
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.CharField(max_length=1024, blank=True)
    late_reply = models.JSONField(null=True, blank=True, help_text="A reply that came after the final state.")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["state", "created_at"], name="command_state_created"),
            models.Index(fields=["device", "created_at"], name="command_device_created"),
            models.Index(fields=["requested_by", "request_id"], name="command_request"),
        ]

    def __str__(self) -> str:
        return f"{self.name} -> {self.device_id} ({self.state})"


class Lease(models.Model):
    """A named role that one bridge holds at a time (for example ``status``: the one bridge that records
    presence), renewed before ``until`` by its owner and taken over by another once it lapses."""

    name = models.CharField(primary_key=True, max_length=64)
    owner = models.CharField(max_length=200)
    until = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.owner} until {self.until:%H:%M:%S}"


class Acknowledgement(models.Model):
    """An operator's acknowledgement of one warning or critical event: who and when (the audit trail).

    ``event_id`` is a plain number, not a foreign key: events are deleted in bulk (retention, device deletion), and
    a foreign key to them would make Django load every deleted event to cascade. The row goes with its device."""

    event_id = models.BigIntegerField(primary_key=True)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="acknowledgements")
    event_ts = models.FloatField(help_text="Receive time of the acknowledged event.")
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="acknowledgements"
    )
    acknowledged_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"event #{self.event_id} of {self.device_id} acknowledged by {self.acknowledged_by}"


class TelemetryRollup(models.Model):
    """One device's numeric telemetry values of one metric within one hour (``hour`` = unix time // 3600): their
    min, max, sum and count. Kept by ingest (``devices/rollups.py``) so that long ranges read a row per hour."""

    # No database constraint: checking it cost PostgreSQL as much as the upsert itself (~20 ms per batch of 2,000
    # rows). Rows can't outlive their device: deleting one deletes them (on_delete), and a batch for a device
    # deleted meanwhile fails on its events' constraint, rollups included (one transaction).
    device = models.ForeignKey(
        Device, on_delete=models.CASCADE, related_name="rollups", db_index=False, db_constraint=False
    )
    metric = models.TextField()
    hour = models.BigIntegerField()
    min = models.FloatField()
    max = models.FloatField()
    total = models.FloatField()
    count = models.BigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["device", "metric", "hour"], name="rollup_device_metric_hour"),
        ]
        indexes = [models.Index(fields=["hour"], name="rollup_hour")]  # retention

    def __str__(self) -> str:
        return f"{self.device_id} {self.metric} hour {self.hour}: {self.count} values"
