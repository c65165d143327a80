"""``runbridge`` as systemd runs it: sd_notify READY / STATUS / WATCHDOG / STOPPING on a real NOTIFY_SOCKET that
the test opens, Prometheus metrics on GATEWAY_METRICS_BIND, and a SIGTERM that flushes and exits 0."""

from __future__ import annotations

import signal
import time
import urllib.request
import uuid

import pytest
from paho.mqtt import publish

from tests.faults.harness import NotifySocket
from tests.support import GatewayProcess, free_port, gateway_env, manage, require_mosquitto, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def start(notify: NotifySocket, mqtt_port: int, prefix: str, metrics_port: int) -> GatewayProcess:
    env = gateway_env(
        MQTT_URL=f"mqtt://127.0.0.1:{mqtt_port}",
        GATEWAY_TOPIC_PREFIX=prefix,
        GATEWAY_MQTT_CLIENT_ID=f"service-test-{uuid.uuid4().hex[:8]}",
        GATEWAY_METRICS_BIND=f"127.0.0.1:{metrics_port}",
        NOTIFY_SOCKET=notify.path,
        WATCHDOG_USEC="1000000",
    )
    return GatewayProcess(manage("runbridge"), env, name="runbridge-service").start()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        return response.read().decode()


def test_ready_status_watchdog_metrics_and_a_clean_stop(notify):
    host, port = require_mosquitto()
    prefix = f"t{uuid.uuid4().hex[:10]}/devices"
    metrics_port = free_port()
    bridge = start(notify, port, prefix, metrics_port)
    try:
        ready = notify.wait_for("READY=1")
        assert f"STATUS=connected to mqtt://{host}:{port}; records presence" in ready.splitlines(), ready
        assert bridge.process is not None
        assert f"MAINPID={bridge.process.pid}" in ready.splitlines()

        # The keep-alive comes from the event loop every WATCHDOG_USEC / 2.
        notify.wait_for("WATCHDOG=1")
        first = len([m for m in notify.poll() if m == "WATCHDOG=1"])
        time.sleep(1.6)
        assert len([m for m in notify.poll() if m == "WATCHDOG=1"]) - first >= 2

        publish.single(f"{prefix}/svc-1/telemetry", '{"temp": 20.5, "seq": 1}', qos=1, hostname=host, port=port)
        wait_for(
            lambda: 'gateway_events_stored_total{kind="telemetry"} 1.0' in scrape(metrics_port),
            timeout=10,
            what="the stored event in the bridge's metrics",
        )
        text = scrape(metrics_port)
        assert "gateway_mqtt_connected 1.0" in text
        assert 'gateway_events_announced_total{kind="telemetry"} 1.0' in text
        assert 'gateway_mqtt_messages_total{kind="telemetry"} 1.0' in text
        assert "gateway_ingest_batch_seconds_bucket" in text

        assert bridge.kill(signal.SIGTERM) == 0, bridge.log()
        stopping = notify.wait_for("STOPPING=1", timeout=2)
        assert "STATUS=stopping" in stopping
    finally:
        bridge.kill()


def test_a_broker_that_is_down_at_start_does_not_hold_readiness_back(notify):
    dead_port = free_port()
    bridge = start(notify, dead_port, f"t{uuid.uuid4().hex[:10]}/devices", free_port())
    try:
        ready = notify.wait_for("READY=1")
        assert f"waiting for the broker at mqtt://127.0.0.1:{dead_port}" in ready, ready
        time.sleep(1.0)
        assert bridge.alive(), bridge.log()
        assert "WATCHDOG=1" in notify.poll()
        assert bridge.kill(signal.SIGTERM) == 0, bridge.log()
    finally:
        bridge.kill()
