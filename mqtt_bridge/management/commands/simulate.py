from __future__ import annotations

import contextlib
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from mqtt_bridge.simulator import Simulator, SimulatorConfig


class Command(BaseCommand):
    help = "Simulate devices over real MQTT: telemetry, retained status with a Last Will, occasional events."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--devices", type=int, default=10, help="number of devices (default 10)")
        parser.add_argument("--rate", type=float, default=1.0, help="telemetry messages per second per device")
        parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
        parser.add_argument("--id-prefix", default="sim-", help="device id prefix (default sim-)")
        parser.add_argument("--qos", type=int, choices=[0, 1], default=1)
        parser.add_argument("--seed", type=int, default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        mqtt = settings.MQTT
        config = SimulatorConfig(
            host=mqtt["HOST"],
            port=mqtt["PORT"],
            prefix=settings.GATEWAY["TOPIC_PREFIX"],
            devices=options["devices"],
            rate=options["rate"],
            id_prefix=options["id_prefix"],
            protocol=mqtt["PROTOCOL"],
            qos=options["qos"],
            username=mqtt["USERNAME"],
            password=mqtt["PASSWORD"],
            tls=mqtt["TLS"],
            seed=options["seed"],
        )
        simulator = Simulator(config)
        self.stdout.write(
            f"Simulating {config.devices} devices at {config.rate:g} Hz each on {mqtt['DISPLAY_URL']} (Ctrl-C stops)"
        )
        with contextlib.suppress(KeyboardInterrupt):
            simulator.run(duration=options["duration"])
        self.stdout.write(f"Published {simulator.published} telemetry messages")
