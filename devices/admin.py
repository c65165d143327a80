from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from devices import services
from devices.models import Acknowledgement, ApiToken, BridgeHeartbeat, Command, Device, Event, Fleet, FleetAccess


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin[Device]):
    list_display = ["id", "name", "kind", "online", "last_seen", "first_seen"]
    list_filter = ["online", "kind", "fleets"]
    search_fields = ["id", "name"]
    readonly_fields = ["first_seen", "last_seen", "status_changed_at", "latest", "latest_ts"]


@admin.register(Event)
class EventAdmin(admin.ModelAdmin[Event]):
    list_display = ["id", "device", "kind", "ts", "device_ts", "seq"]
    list_filter = ["kind"]
    search_fields = ["device__id"]
    raw_id_fields = ["device"]
    readonly_fields = ["device", "kind", "ts", "device_ts", "seq", "body"]
    show_full_result_count = False


class FleetAccessInline(admin.TabularInline[FleetAccess, Fleet]):
    model = FleetAccess
    extra = 1


@admin.register(Fleet)
class FleetAdmin(admin.ModelAdmin[Fleet]):
    list_display = ["name"]
    filter_horizontal = ["devices"]
    inlines = [FleetAccessInline]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    """Tokens are issued with ``manage.py issue_token`` (the token is shown once); here they are listed and revoked.
    Open sockets using a revoked token are closed within seconds."""

    list_display = ["prefix", "user", "name", "created", "last_used", "revoked_at"]
    readonly_fields = ["prefix", "key_hash", "created", "last_used", "revoked_at"]
    list_filter = ["revoked_at"]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        for token in queryset.filter(revoked_at__isnull=True):
            services.revoke_token(token_id=token.id)


@admin.register(BridgeHeartbeat)
class BridgeHeartbeatAdmin(admin.ModelAdmin[BridgeHeartbeat]):
    list_display = ["name", "connected", "detail", "updated_at"]


@admin.register(Command)
class CommandAdmin(admin.ModelAdmin[Command]):
    """The audit trail: who sent what to which device, when, and how it ended."""

    list_display = ["created_at", "device", "name", "state", "requested_by", "request_id", "finished_at", "error"]
    list_filter = ["state", "name"]
    search_fields = ["id", "device__id", "name", "request_id", "requested_by__username"]
    raw_id_fields = ["device", "requested_by"]
    readonly_fields = [f.name for f in Command._meta.fields]
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # commands are sent from the console, WebSocket or API, which validate and publish them


@admin.register(Acknowledgement)
class AcknowledgementAdmin(admin.ModelAdmin[Acknowledgement]):
    """Who acknowledged which alert, and when (acknowledged from the console or ``POST /api/alerts/ack``)."""

    list_display = ["event_id", "device", "acknowledged_by", "acknowledged_at"]
    search_fields = ["device__id", "acknowledged_by__username"]
    raw_id_fields = ["device", "acknowledged_by"]
    readonly_fields = [f.name for f in Acknowledgement._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # acknowledged from the console or the API, which check the operator's permission
