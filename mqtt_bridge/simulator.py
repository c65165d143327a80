"""Simulated devices over real MQTT (paho): telemetry, retained status with a Last Will, occasional events, and
replies to commands."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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
    reply_delay: float = 0.05
    """Seconds a device takes to answer a command."""
    reply_failure_rate: float = 0.0
    """Share of commands answered with ``ok: false`` (0.0 to 1.0)."""


# How many recent command ids a device remembers, to answer a redelivered (or republished) command only once.
RECENT_COMMANDS = 1024


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
        # Every command name: PREFIX/ID/commands/+ (the Topics builder only makes topics for valid names).
        self.commands_filter = topics.command_filter(device_id)
        self.replies_topic = topics.device(device_id, Channel.REPLIES)
        self.client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_command
        # Only paho's network thread touches these two (in on_message).
        self._reply_rng = random.Random(rng.random())
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._timers: set[threading.Timer] = set()
        self._timers_lock = threading.Lock()
        self.subscribed = threading.Event()
        """Set once the command subscription is acknowledged (on each connection)."""
        self.replied = 0
        self.ignored = 0

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            logger.warning("%s could not connect: %s", self.state.device_id, reason)
            return
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        self.subscribed.clear()
        client.subscribe(self.commands_filter, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            logger.warning("%s could not subscribe to its commands: %s", self.state.device_id, reasons)
            return
        self.subscribed.set()

    def _on_command(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """A command: answer it once, after ``reply_delay``. A retained command is old news and never executed."""
        if message.retain:
            self.ignored += 1
            logger.info("%s ignored a retained command on %s", self.state.device_id, message.topic)
            return
        try:
            command = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            command = None
        command_id = command.get("id") if isinstance(command, dict) else None
        if not isinstance(command_id, str) or not command_id:
            self.ignored += 1
            logger.warning("%s ignored a malformed command on %s", self.state.device_id, message.topic)
            return
        if command_id in self._recent:
            self.ignored += 1
            logger.info("%s ignored command %s: already answered", self.state.device_id, command_id)
            return
        self._recent[command_id] = None
        if len(self._recent) > RECENT_COMMANDS:
            self._recent.popitem(last=False)
        assert isinstance(command, dict)
        if self._reply_rng.random() < self.config.reply_failure_rate:
            reply: dict[str, Any] = {"id": command_id, "ok": False, "error": "simulated failure"}
        else:
            reply = {"id": command_id, "ok": True, "result": {"echo": command.get("params")}}
        payload = orjson.dumps(reply)
        correlation = getattr(message.properties, "CorrelationData", None)
        if self.config.reply_delay <= 0:
            self._reply(payload, correlation)
            return
        # Never sleep in paho's network thread: it would stall every other message of this connection.
        timer = threading.Timer(self.config.reply_delay, self._reply_later, args=(payload, correlation))
        timer.daemon = True
        with self._timers_lock:
            self._timers.add(timer)
        timer.start()

    def _reply_later(self, payload: bytes, correlation: bytes | None) -> None:
        current = threading.current_thread()
        with self._timers_lock:
            if isinstance(current, threading.Timer):
                self._timers.discard(current)
        self._reply(payload, correlation)

    def _reply(self, payload: bytes, correlation: bytes | None) -> None:
        properties = None
        if self.config.protocol == "5" and correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        info = self.client.publish(self.replies_topic, payload, qos=1, properties=properties)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            with self._timers_lock:
                self.replied += 1
        else:
            logger.warning("reply from %s failed: %s", self.state.device_id, mqtt.error_string(info.rc))

    def connect(self) -> None:
        self.client.connect_async(self.config.host, self.config.port, keepalive=30)
        self.client.loop_start()

    def disconnect(self) -> None:
        with self._timers_lock:
            pending, self._timers = self._timers, set()
        for timer in pending:
            timer.cancel()
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
    """Runs ``devices`` simulated devices, each publishing telemetry at ``rate`` Hz (none at 0) and answering
    commands, until ``stop()``."""

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

    @property
    def replied(self) -> int:
        """Commands answered so far, over all devices."""
        return sum(device.replied for device in self.devices)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every device is connected and subscribed to its commands; False on timeout."""
        deadline = time.monotonic() + timeout
        return all(device.subscribed.wait(max(0.0, deadline - time.monotonic())) for device in self.devices)

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
        # (No telemetry at all for a rate of 0: inf * 0 would be NaN, and a NaN deadline spins this loop.)
        due = [
            started + interval * n / max(1, len(self.devices)) if math.isfinite(interval) else math.inf
            for n in range(len(self.devices))
        ]
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
