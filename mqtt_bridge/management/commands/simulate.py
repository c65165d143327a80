from __future__ import annotations

import argparse
import contextlib
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from mqtt_bridge.simulator import Simulator, SimulatorConfig


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds >= 0")
    return number


def _rate(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rate from 0 to 1")
    return number


class Command(BaseCommand):
    help = (
        "Simulate devices over real MQTT: telemetry, retained status with a Last Will, occasional events, and "
        "replies to commands."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--devices", type=int, default=10, help="number of devices (default 10)")
        parser.add_argument("--rate", type=float, default=1.0, help="telemetry messages per second per device")
        parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
        parser.add_argument("--id-prefix", default="sim-", help="device id prefix (default sim-)")
        parser.add_argument("--qos", type=int, choices=[0, 1], default=1)
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument(
            "--reply-delay", type=_non_negative, default=0.05, help="seconds a device takes to answer a command"
        )
        parser.add_argument(
            "--fail-rate", type=_rate, default=0.0, help="share of commands answered ok=false, 0 to 1 (default 0)"
        )

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
            reply_delay=options["reply_delay"],
            reply_failure_rate=options["fail_rate"],
        )
        simulator = Simulator(config)
        self.stdout.write(
            f"Simulating {config.devices} devices at {config.rate:g} Hz each on {mqtt['DISPLAY_URL']} (Ctrl-C stops)"
        )
        with contextlib.suppress(KeyboardInterrupt):
            simulator.run(duration=options["duration"])
        self.stdout.write(f"Published {simulator.published} telemetry messages, answered {simulator.replied} commands")
