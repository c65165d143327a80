from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from mqtt_bridge import metrics
from mqtt_bridge.bridge import Bridge
from mqtt_bridge.client import BrokerUnavailable
from mqtt_bridge.factory import bridge_from_settings
from mqtt_bridge.systemd import Notifier, ServiceStatus, SystemdSettings, keep_alive

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run the MQTT bridge alone (production: the web side runs in Daphne; REDIS_URL joins them). "
        "Speaks sd_notify under systemd (READY, STATUS, WATCHDOG, STOPPING)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--retire",
            action="store_true",
            help="scale down: store what the broker queued for this client id, end its session, and exit",
        )
        parser.add_argument(
            "--idle", type=float, default=2.0, help="with --retire: seconds without a message that mean drained"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            self.stderr.write(
                "runbridge: REDIS_URL is not set, so stored events reach no web process "
                "(use rungateway for one process, or set REDIS_URL)"
            )
        gc.freeze()  # what is loaded now lives as long as the process: out of full collections (see config/asgi.py)
        if options["retire"]:
            asyncio.run(self._retire(idle=options["idle"]))
        else:
            asyncio.run(self._run())

    async def _run(self) -> None:
        systemd = SystemdSettings.from_settings(settings.SYSTEMD)
        notifier = Notifier(systemd.notify_socket)
        bridge = bridge_from_settings(on_state=ServiceStatus(notifier, where=settings.MQTT["DISPLAY_URL"]))
        bind = settings.GATEWAY["METRICS_BIND"]
        if bind is not None:
            metrics.serve(*bind)
        loop = asyncio.get_running_loop()

        stop_timeout = settings.GATEWAY["STOP_TIMEOUT"]

        def stop() -> None:
            notifier.stopping("stopping: storing and acknowledging the current batch")
            bridge.stop()
            loop.call_later(stop_timeout, give_up)

        def give_up() -> None:
            # The batch waits on something that does not answer (a database call in a worker thread cannot be
            # cancelled): leave now, unacknowledged messages go to the next bridge, and the exit status says so.
            logger.error(
                "bridge %s did not stop within %g s of the signal (GATEWAY_STOP_TIMEOUT); exiting, its "
                "unacknowledged messages will be redelivered",
                bridge.settings.name,
                stop_timeout,
            )
            notifier.close()
            logging.shutdown()
            os._exit(1)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        interval = systemd.watchdog_interval()
        watchdog = asyncio.create_task(keep_alive(notifier, interval)) if interval else None
        self._say(
            bridge,
            f"starting ({settings.MQTT['DISPLAY_URL']}" + (f", metrics on {bind[0]}:{bind[1]})" if bind else ")"),
        )
        try:
            await bridge.run()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            notifier.close()

    async def _retire(self, *, idle: float) -> None:
        bridge = bridge_from_settings()
        if not bridge.settings.shared_group:
            raise CommandError("--retire is for bridges in a shared group (GATEWAY_MQTT_SHARED_GROUP is not set)")
        self._say(bridge, "retiring: storing what the broker queued for it, then ending its session")
        try:
            stored = await bridge.retire(idle=idle)
        except BrokerUnavailable as exc:
            raise CommandError(f"could not retire bridge {bridge.settings.name}: {exc}") from exc
        self._say(bridge, f"retired: stored {stored} queued message(s); its session is gone")

    def _say(self, bridge: Bridge, text: str) -> None:
        self.stdout.write(f"Bridge {bridge.settings.name} {text}")
        self.stdout.flush()
