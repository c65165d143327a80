"""Simulated devices over real MQTT (paho): telemetry, retained status with a Last Will, occasional events."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_bridge.topics import Channel, Topics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    host: str
    port: int
    prefix: str = "devices"
    devices: int = 10
    rate: float = 1.0
    id_prefix: str = "sim-"
    protocol: str = "3.1.1"
    qos: int = 1
    event_probability: float = 0.01
    username: str | None = None
    password: str | None = None
    tls: bool = False
    seed: int | None = None


@dataclass(slots=True)
class DeviceState:
    device_id: str
    temp: float
    hum: float
    battery: float = 100.0
    # Milliseconds since the epoch: increases across runs, so a restarted simulator is not taken for a
    # redelivery of its previous run (the gateway drops a (device, seq) it has already stored).
    seq: int = field(default_factory=lambda: int(time.time() * 1000))
    phase: float = field(default_factory=random.random)


class SimulatedDevice:
    """One device: its own MQTT connection with a Last Will of ``offline`` (retained)."""

    def __init__(self, config: SimulatorConfig, topics: Topics, device_id: str, rng: random.Random) -> None:
        self.config = config
        self.topics = topics
        self.rng = rng
        self.state = DeviceState(device_id=device_id, temp=rng.uniform(18, 24), hum=rng.uniform(30, 60))
        version = mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device_id}", protocol=version)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        if config.tls:
            self.client.tls_set()
        self.status_topic = topics.device(device_id, Channel.STATUS)
        self.client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.publish(self.status_topic, b"online", qos=1, retain=True)

    def connect(self) -> None:
        self.client.connect_async(self.config.host, self.config.port, keepalive=30)
        self.client.loop_start()

    def disconnect(self) -> None:
        info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
        info.wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()

    def telemetry(self, now: float) -> bytes:
        s = self.state
        s.seq += 1
        s.temp += self.rng.gauss(0, 0.1)
        s.hum = min(100.0, max(0.0, s.hum + self.rng.gauss(0, 0.3)))
        s.battery = max(0.0, s.battery - 0.001)
        wave = math.sin(now / 30 + s.phase * 6.28)
        return orjson.dumps(
            {
                "ts": round(now, 3),
                "seq": s.seq,
                "temp": round(s.temp + wave, 2),
                "hum": round(s.hum, 1),
                "battery": round(s.battery, 2),
                "power": {"volts": round(3.3 + wave / 10, 3)},
            }
        )

    def event(self) -> bytes:
        severity = self.rng.choice(["info", "warning", "warning", "critical"])
        return orjson.dumps(
            {
                "name": "threshold",
                "severity": severity,
                "message": f"temperature {self.state.temp:.1f} C",
                "metric": "temp",
            }
        )

    def publish(self, channel: Channel, payload: bytes) -> None:
        info = self.client.publish(self.topics.device(self.state.device_id, channel), payload, qos=self.config.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            logger.warning("publish from %s failed: %s", self.state.device_id, mqtt.error_string(info.rc))


class Simulator:
    """Runs ``devices`` simulated devices, each publishing telemetry at ``rate`` Hz, until ``stop()``."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        rng = random.Random(config.seed)
        topics = Topics(config.prefix)
        width = max(3, len(str(config.devices)))
        self.devices = [
            SimulatedDevice(config, topics, f"{config.id_prefix}{n:0{width}d}", random.Random(rng.random()))
            for n in range(1, config.devices + 1)
        ]
        self.published = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="simulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self, duration: float | None = None) -> None:
        for device in self.devices:
            device.connect()
        interval = 1.0 / self.config.rate if self.config.rate > 0 else math.inf
        started = time.monotonic()
        # Spread devices evenly over one interval so load is smooth rather than bursty.
        due = [started + interval * n / max(1, len(self.devices)) for n in range(len(self.devices))]
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if duration is not None and now - started >= duration:
                    break
                soonest = min(due) if due else now + 1
                if soonest > now:
                    self._stop.wait(min(soonest - now, 0.5))
                    continue
                wall = time.time()
                for index, device in enumerate(self.devices):
                    if due[index] <= now:
                        device.publish(Channel.TELEMETRY, device.telemetry(wall))
                        self.published += 1
                        if device.rng.random() < self.config.event_probability:
                            device.publish(Channel.EVENTS, device.event())
                        due[index] += interval
                        if due[index] < now - 1:  # fell behind by more than a second: skip, don't burst
                            due[index] = now + interval
        finally:
            for device in self.devices:
                device.disconnect()
