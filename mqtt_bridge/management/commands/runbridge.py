from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from mqtt_bridge.factory import bridge_from_settings


class Command(BaseCommand):
    help = "Run the MQTT bridge alone (production: the web side runs in Daphne; REDIS_URL joins them)."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            self.stderr.write(
                "runbridge: REDIS_URL is not set, so stored events reach no web process "
                "(use rungateway for one process, or set REDIS_URL)"
            )
        asyncio.run(self._run())

    async def _run(self) -> None:
        bridge = bridge_from_settings()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop)
        self.stdout.write(f"Bridge {bridge.settings.name} starting ({settings.MQTT['DISPLAY_URL']})")
        self.stdout.flush()
        await bridge.run()
