"""Everything in one process: Daphne, the bridge, and optionally an embedded broker and demo devices.

Daphne has no ASGI lifespan, so the bridge (and broker) are scheduled on Daphne's event loop from here, once
the server is ready, and stopped before the reactor shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from daphne.endpoints import build_endpoint_description_strings
from daphne.server import Server  # imported early: it installs Twisted's asyncio reactor
from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.asgi import application
from mqtt_bridge.embedded_broker import EmbeddedBroker, broker_answers
from mqtt_bridge.factory import bridge_from_settings
from mqtt_bridge.simulator import Simulator, SimulatorConfig

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0


def parse_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"--bind {value!r}: expected HOST:PORT, for example 127.0.0.1:8000")
    return host.strip("[]") or "127.0.0.1", int(port)


class Command(BaseCommand):
    help = "Run the gateway in one process: web server (Daphne), MQTT bridge, optional embedded broker and demo."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT for the web server")
        parser.add_argument(
            "--embedded-broker",
            action="store_true",
            help="start an MQTT broker in this process where MQTT_URL points, unless one already answers there",
        )
        parser.add_argument("--demo", type=int, default=0, metavar="N", help="also run N simulated devices")
        parser.add_argument("--demo-rate", type=float, default=1.0, help="telemetry per second per demo device")

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = parse_bind(options["bind"])
        mqtt = settings.MQTT
        self.broker: EmbeddedBroker | None = None
        protocol = mqtt["PROTOCOL"]
        if options["embedded_broker"]:
            if broker_answers(mqtt["HOST"], mqtt["PORT"]):
                self.stdout.write(f"MQTT: a broker already answers at {mqtt['DISPLAY_URL']}; using it.")
            else:
                self.broker = EmbeddedBroker(host=mqtt["HOST"], port=mqtt["PORT"])
                protocol = "3.1.1"
                self.stdout.write(f"MQTT: starting the embedded broker at {mqtt['DISPLAY_URL']} (MQTT 3.1.1).")
        self.bridge = bridge_from_settings(protocol=protocol)
        self.simulator: Simulator | None = None
        if options["demo"] > 0:
            self.simulator = Simulator(
                SimulatorConfig(
                    host=mqtt["HOST"],
                    port=mqtt["PORT"],
                    prefix=settings.GATEWAY["TOPIC_PREFIX"],
                    devices=options["demo"],
                    rate=options["demo_rate"],
                    id_prefix="demo-",
                    protocol=protocol,
                    username=mqtt["USERNAME"],
                    password=mqtt["PASSWORD"],
                    tls=mqtt["TLS"],
                )
            )
        self.url = f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}/"
        self.failed = False
        server = Server(
            application=ASGIStaticFilesHandler(application),
            endpoints=build_endpoint_description_strings(host=host, port=port),
            signal_handlers=True,
            ready_callable=self._ready,
            websocket_max_message_size=settings.GATEWAY["WS_MAX_FRAME"] * 4,
            application_close_timeout=5,
        )
        self.server = server
        server.run()
        if self.failed:
            sys.exit(1)

    def _ready(self) -> None:
        from twisted.internet import defer, reactor

        loop = asyncio.get_event_loop()
        self.started = loop.create_task(self._start())
        twisted_reactor: Any = reactor  # typed as a module; it is the asyncio reactor Daphne installed
        twisted_reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: defer.Deferred.fromFuture(asyncio.ensure_future(self._stop()))
        )

    async def _start(self) -> None:
        if self.broker is not None:
            try:
                await self.broker.start()
            except Exception as exc:
                self.stderr.write(f"MQTT: the embedded broker could not start: {exc}")
                self.failed = True
                self.server.stop()
                return
        self.bridge_task = asyncio.create_task(self.bridge.run(), name="bridge")
        if self.simulator is not None:
            self.simulator.start()
        self.stdout.write(f"Gateway console: {self.url}  (stop with Ctrl-C)")
        self.stdout.flush()

    async def _stop(self) -> None:
        if self.simulator is not None:
            await asyncio.to_thread(self.simulator.stop)
        self.bridge.stop()
        task = getattr(self, "bridge_task", None)
        if task is not None:
            try:
                await asyncio.wait_for(task, STOP_TIMEOUT)
            except Exception as exc:
                logger.warning("bridge did not stop cleanly: %r", exc)
        if self.broker is not None:
            await self.broker.stop()
