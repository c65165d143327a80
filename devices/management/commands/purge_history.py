from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from devices import services


class Command(BaseCommand):
    help = "Delete events older than the retention period (GATEWAY_HISTORY_RETENTION_DAYS)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=None, help="override the retention period")

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"] or settings.GATEWAY["HISTORY_RETENTION_DAYS"]
        removed = services.purge_history(older_than=time.time() - days * 86400)
        self.stdout.write(f"Removed {removed} events older than {days} days")
