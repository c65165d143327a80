"""The reliability matrix, data services (issue 8): Redis (the channel layer) and PostgreSQL (the history) are
killed and restarted under a running gateway (one Daphne, one ``runbridge``, a Mosquitto of the test's own), and
what users see is checked: events in a WebSocket client that resumes as protocol section 9.4 asks, commands'
answers, /metrics, RSS.

Outage lengths are settings: ``GATEWAY_FAULTS_REDIS_OUTAGE`` (seconds; the matrix says about a minute, but each case
must end within one, so the default is 35, and ``=60`` runs the full minute) and ``GATEWAY_FAULTS_POSTGRES_OUTAGE``
(default 15).

A Redis-layer consumer left idle past redis-py's 5 s socket timeout is also covered without breaking anything by
``tests/gateway/test_redis_topology.py`` (real Daphne and ``runbridge``); here it is checked again on connections made
after a Redis restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.faults.harness import (
    DaphneAndBridge,
    PrivatePostgres,
    PrivateRedis,
    Watcher,
    fresh_database,
    operator_token,
    stored_event_ids,
)
from tests.support import (
    PahoDevice,
    PrivateMosquitto,
    free_port,
    http_ok,
    require_mosquitto_binary,
    wait_for,
)

REDIS_OUTAGE = float(os.environ.get("GATEWAY_FAULTS_REDIS_OUTAGE", "35"))
POSTGRES_OUTAGE = float(os.environ.get("GATEWAY_FAULTS_POSTGRES_OUTAGE", "15"))
IDLE = 7.0  # past redis-py 8's default socket timeout (5 s), the channels_redis BZPOPMIN wait
RECOVERY_LIMIT = 15.0  # seconds from a service's return to a fresh event on the browser (measured: see the report)
RSS_GROWTH_LIMIT = 40.0  # MiB a process may grow during an outage
QUEUE_MAX = 100  # the bridge's incoming MQTT queue (GATEWAY_MQTT_QUEUE_MAX, its minimum) in the PostgreSQL case
QOS0_BURST = 3000


# --- devices ------------------------------------------------------------------------------------------------------


class Ticker(threading.Thread):
    """One device publishing telemetry ``{"seq": n, "v": n}`` every ``interval`` s at QoS 1 (after an ``online``
    status), remembering when each seq went out; ``publish_one`` sends the next seq by hand."""

    def __init__(self, port: int, prefix: str, device_id: str, interval: float = 0.1) -> None:
        super().__init__(name=f"ticker-{device_id}", daemon=True)
        self.device_id = device_id
        self._topic = f"{prefix}/{device_id}/telemetry"
        self._interval = interval
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.sent_at: dict[int, float] = {}
        self._infos: list[mqtt.MQTTMessageInfo] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ticker-{uuid.uuid4().hex[:8]}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.publish(f"{prefix}/{device_id}/status", b"online", qos=1).wait_for_publish(5)

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            self.publish_one()

    def publish_one(self) -> int:
        with self._lock:
            seq = len(self.sent_at) + 1
            self.sent_at[seq] = time.monotonic()
            info = self.client.publish(self._topic, json.dumps({"seq": seq, "v": seq}), qos=1)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
            self._infos.append(info)
        return seq

    def first_after(self, moment: float) -> int | None:
        """The first seq published at or after ``moment``."""
        with self._lock:
            return next((seq for seq, at in self.sent_at.items() if at >= moment), None)

    def halt(self) -> set[int]:
        """Stop ticking (``publish_one`` still works); every seq published, each acknowledged by the broker."""
        self._halt.set()
        if self.is_alive():
            self.join(5)
        for info in self._infos:
            info.wait_for_publish(10)
        return set(self.sent_at)

    def close(self) -> None:
        self.halt()
        self.client.disconnect()
        self.client.loop_stop()


def publish_burst(port: int, topic: str, count: int, qos: int) -> None:
    """``count`` telemetry messages at once on one topic (``v`` from 1)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"burst-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, json.dumps({"v": n}), qos=qos) for n in range(1, count + 1)]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


# --- the browser --------------------------------------------------------------------------------------------------


class ResumingWatcher(Watcher):
    """A watcher that behaves like a client of protocol section 9.4 that keeps history: after a ``gap`` it resumes
    from before the gap (once per gap: 9.4 also allows reloading state instead), and when its socket closes it
    reconnects and subscribes after the highest id it has (dedupe by id).

    Frames the watcher does not count as events (``gap``, ``error``) stay in ``other``; ``telemetry_at`` keeps when
    each (device, seq) first arrived."""

    def __init__(self, port: int, token: str) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws/?token={token}"
        self.telemetry_at: dict[tuple[str, int], float] = {}
        self.reconnects = 0
        self.resumed_after: set[int] = set()
        super().__init__(port, token)

    def run(self) -> None:
        try:
            self._follow()
        except BaseException as exc:
            self.error = exc

    def _follow(self) -> None:
        while not self._closing.is_set():
            try:
                frame = json.loads(self.ws.recv(timeout=0.2))
            except TimeoutError:
                continue
            except ConnectionClosed:
                if not self._closing.is_set():
                    self._reconnect()
                continue
            with self._lock:
                for event in frame["events"] if frame["type"] == "batch" else [frame]:
                    if event.get("type") != "subscribed":
                        self._record(event)
                    if event.get("type") == "telemetry":
                        self.telemetry_at.setdefault((event["device"], int(event["values"]["v"])), time.monotonic())
            if frame["type"] == "gap" and frame["from"] - 1 not in self.resumed_after:
                self.resumed_after.add(frame["from"] - 1)  # once: a capped replay starts with a gap of its own
                with contextlib.suppress(ConnectionClosed):
                    self.ws.send(json.dumps({"op": "resume", "after": frame["from"] - 1}))

    def _reconnect(self) -> None:
        while not self._closing.is_set():
            time.sleep(0.5)
            try:
                ws = connect(self.url, max_size=2**24, open_timeout=5)
                hello = json.loads(ws.recv(timeout=10))
                assert hello["type"] == "hello", hello
                after = max(self.received_ids(), default=hello["last_id"])
                ws.send(json.dumps({"op": "subscribe", "devices": "*", "after": after}))
            except (OSError, TimeoutError, ConnectionClosed, AssertionError):
                continue
            self.ws = ws
            self.reconnects += 1
            return

    def send(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed):
            self.ws.send(json.dumps(frame))

    def error_for(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            return next((f for f in self.other if f.get("type") == "error" and f.get("ref") == request_id), None)

    def seqs(self, device_id: str) -> set[int]:
        with self._lock:
            return {v for device, v in self.telemetry if device == device_id}

    def gaps(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f for f in self.other if f.get("type") == "gap"]

    def commands_by_request(self, request_id: str) -> list[str]:
        with self._lock:
            frames = sorted((e["id"], e["state"]) for _, e in self.commands if e.get("request_id") == request_id)
        return [state for _, state in frames]

    def arrival_of(self, device_id: str, seq: int) -> float | None:
        with self._lock:
            return self.telemetry_at.get((device_id, seq))


@contextlib.contextmanager
def browsing(port: int, token: str) -> Iterator[ResumingWatcher]:
    watcher = ResumingWatcher(port, token)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.close()


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    require_mosquitto_binary()
    broker = PrivateMosquitto(free_port(), tmp_path).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis().start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A cluster of this module's own (initdb once), started; the cases stop and start it."""
    cluster = PrivatePostgres().init()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def print_figures(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def ticking(
    stack: contextlib.ExitStack, gateway: DaphneAndBridge, token: str, mqtt_port: int, run: str, *, answering: bool
) -> tuple[ResumingWatcher, Ticker]:
    """Start ``gateway`` (and wait until it is ready), a browser on it and a device ``tick-<run>`` ticking (with, when
    ``answering``, a device answering its commands), all closed with ``stack``; once the browser has five events."""
    gateway.start().wait_ready()
    browser = stack.enter_context(browsing(gateway.web_port, token))
    ticker = Ticker(mqtt_port, gateway.prefix, f"tick-{run}")
    stack.callback(ticker.close)
    if answering:
        device = PahoDevice(mqtt_port, gateway.prefix, ticker.device_id).start()
        stack.callback(device.stop)
    ticker.start()
    wait_for(lambda: len(browser.seqs(ticker.device_id)) >= 5, timeout=10, what="the first events")
    return browser, ticker


def wait_recovered(browser: ResumingWatcher, ticker: Ticker, back_at: float, what: str) -> float:
    """Seconds from ``back_at`` (the service answers again) to the browser holding an event published after it."""

    def fresh_arrival() -> float | None:
        seq = ticker.first_after(back_at)
        return None if seq is None else browser.arrival_of(ticker.device_id, seq)

    arrived = wait_for(fresh_arrival, timeout=RECOVERY_LIMIT, interval=0.05, what=f"a fresh event after {what}")
    return float(arrived - back_at)


class Comeback(NamedTuple):
    rss_during: tuple[float, float]  # Daphne's and the bridge's RSS at the end of the outage, MiB
    back_at: float  # when the service answered again
    recovery: float  # seconds from then to a fresh event on the browser
    published: set[int]  # every seq the ticker published


def end_outage(
    gateway: DaphneAndBridge,
    browser: ResumingWatcher,
    ticker: Ticker,
    down_at: float,
    outage: float,
    restart: Callable[[], object],
    service: str,
    every: str,
) -> Comeback:
    """Let the outage last ``outage`` s from ``down_at``, take the RSS, ``restart`` the service; then wait for a fresh
    event on the browser, for a command to succeed, and (the ticker halted) for ``every`` event published."""
    time.sleep(max(0.0, outage - (time.monotonic() - down_at)))
    rss_during = gateway.rss()
    restart()
    back_at = time.monotonic()
    recovery = wait_recovered(browser, ticker, back_at, f"{service} came back")
    browser.send({"op": "command", "device": ticker.device_id, "name": "reboot", "request_id": "after"})
    wait_for(lambda: browser.commands_by_request("after")[-1:] == ["succeeded"], timeout=15, what="a command")
    published = ticker.halt()
    wait_for(lambda: browser.seqs(ticker.device_id) == published, timeout=15, what=every)
    return Comeback(rss_during, back_at, recovery, published)


def check_nothing_lost_and_memory_bounded(
    browser: ResumingWatcher, database_url: str, rss_before: tuple[float, float], rss_during: tuple[float, float]
) -> list[float]:
    """The browser failed nothing and holds every stored telemetry event, and neither process grew past
    RSS_GROWTH_LIMIT during the outage; the growth (Daphne, bridge) in MiB."""
    assert browser.error is None, browser.error
    assert stored_event_ids(database_url, "telemetry") <= set(browser.received_ids()), (
        "every stored event reached the browser"
    )
    growth = [during - before for before, during in zip(rss_before, rss_during, strict=True)]
    assert max(growth) < RSS_GROWTH_LIMIT, f"RSS grew by {growth} MiB (Daphne, bridge)"
    return growth


# --- Redis ----------------------------------------------------------------------------------------------------------


def test_a_redis_restart_costs_browsers_nothing_and_an_idle_spell_after_it_neither(
    mosquitto, private_redis, database, capsys
):
    """Matrix rows "Redis restart" and "a Redis-layer consumer idle for longer than the client's socket timeout":
    Redis is killed and restarted empty under a steady device; the browser gets every event (live, or resumed after a
    gap) within seconds, and after the restart an idle spell past redis-py's 5 s socket timeout still ends with the
    next event delivered."""
    run = uuid.uuid4().hex[:6]
    gateway = DaphneAndBridge(database, private_redis.url, mosquitto.port, prefix=f"f{run}/devices")
    token = operator_token(database, "faults")
    with contextlib.ExitStack() as stack:
        stack.callback(gateway.stop, signal.SIGKILL)
        browser, ticker = ticking(stack, gateway, token, mosquitto.port, run, answering=False)

        private_redis.kill()
        private_redis.start()
        back_at = time.monotonic()
        try:
            recovery = wait_recovered(browser, ticker, back_at, "the Redis restart")
            time.sleep(1)
            published = ticker.halt()
            wait_for(lambda: browser.seqs(ticker.device_id) == published, timeout=15, what="every event")
            hub_errors = gateway.web_count("gateway_hub_layer_errors_total")
            time.sleep(IDLE)
            idle_over = time.monotonic()
            seq = ticker.publish_one()
            wait_for(lambda: seq in browser.seqs(ticker.device_id), timeout=10, what="the event after the idle spell")
            after_idle = time.monotonic() - idle_over
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{gateway.logs()}") from None
        layer_failures = gateway.bridge_count("gateway_layer_send_failures_total")
        lost_batches = gateway.web_count("gateway_hub_lost_batches_total")
        caught_up = gateway.web_count("gateway_hub_caught_up_events_total")
        assert browser.error is None, browser.error
        assert stored_event_ids(database, "telemetry") <= set(browser.received_ids()), (
            "every stored event reached the browser"
        )
        assert hub_errors >= 1, "the hub saw the layer go (counted in gateway_hub_layer_errors_total)"
        assert gateway.web_count("gateway_hub_layer_errors_total") == hub_errors, (
            "no layer error during the idle spell after the restart"
        )
    print_figures(
        capsys,
        f"redis restart: a fresh event reached the browser {recovery:.2f} s after Redis was back; "
        f"{len(published)} events, none lost ({len(browser.gaps())} gap frames, {browser.reconnects} reconnects); "
        f"hub layer errors {hub_errors:.0f}, bridge layer send failures {layer_failures:.0f}, "
        f"batches lost {lost_batches:.0f}, caught up from the database {caught_up:.0f}; "
        f"after a {IDLE:.0f} s idle spell the next event arrived in {after_idle * 1000:.0f} ms",
    )


def test_redis_down_for_most_of_a_minute_refuses_commands_counts_losses_and_recovers_by_itself(
    mosquitto, private_redis, database, capsys
):
    """Matrix row "Redis down for a minute": while the layer is down, a command is refused with an explicit error,
    the losses are counted in /metrics and memory stays bounded; when Redis is back the browser gets a fresh event
    within seconds and, after resuming, every event; a command then goes through to its final state."""
    run = uuid.uuid4().hex[:6]
    gateway = DaphneAndBridge(database, private_redis.url, mosquitto.port, prefix=f"f{run}/devices")
    token = operator_token(database, "faults")
    with contextlib.ExitStack() as stack:
        stack.callback(gateway.stop, signal.SIGKILL)
        browser, ticker = ticking(stack, gateway, token, mosquitto.port, run, answering=True)
        rss_before = gateway.rss()

        private_redis.kill()
        down_at = time.monotonic()
        try:
            time.sleep(2)
            browser.send({"op": "command", "device": ticker.device_id, "name": "reboot", "request_id": "while-down"})
            refusal = wait_for(lambda: browser.error_for("while-down"), timeout=10, what="the command's refusal")
            wait_for(lambda: gateway.bridge_count("gateway_layer_send_failures_total") > 0, timeout=10, what="drops")
            ready_while_down = http_ok(f"http://127.0.0.1:{gateway.web_port}/readyz")
            rss_during, back_at, recovery, published = end_outage(
                gateway, browser, ticker, down_at, REDIS_OUTAGE, private_redis.start, "Redis", "every event"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{gateway.logs()}") from None
        layer_failures = gateway.bridge_count("gateway_layer_send_failures_total")
        hub_errors = gateway.web_count("gateway_hub_layer_errors_total")
        caught_up = gateway.web_count("gateway_hub_caught_up_events_total")
        assert refusal["code"] == "unavailable", refusal
        assert browser.commands_by_request("while-down") == [], "the refused command was not stored"
        assert browser.commands_by_request("after") == ["pending", "sent", "succeeded"]
        assert not ready_while_down, "/readyz says the layer is down"
        assert layer_failures > 0 and hub_errors > 0, (layer_failures, hub_errors)
        growth = check_nothing_lost_and_memory_bounded(browser, database, rss_before, rss_during)
    print_figures(
        capsys,
        f"redis down {back_at - down_at:.0f} s: command refused ({refusal['code']}); a fresh event reached the "
        f"browser {recovery:.2f} s after Redis was back; {len(published)} events, none lost "
        f"({len(browser.gaps())} gap frames, {browser.reconnects} reconnects, {caught_up:.0f} caught up from the "
        f"database); bridge layer send failures {layer_failures:.0f}, hub layer errors {hub_errors:.0f}; "
        f"RSS growth during the outage (Daphne, bridge) {growth[0]:.1f}, {growth[1]:.1f} MiB",
    )


# --- PostgreSQL -----------------------------------------------------------------------------------------------------


def post_command(port: int, token: str, device_id: str, request_id: str) -> tuple[int, dict[str, Any]]:
    """POST /api/commands; the status and the JSON body (or the text, when it is not JSON)."""
    body = json.dumps({"device": device_id, "name": "reboot", "request_id": request_id}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/commands",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"text": text[:300]}


def test_postgresql_down_holds_qos1_counts_what_overflows_refuses_commands_and_recovers_by_itself(
    mosquitto, private_redis, private_postgres, capsys
):
    """Matrix row "PostgreSQL restart or down": while the database is down the bridge holds its batch, its incoming
    queue stays bounded and what overflows it (a QoS 0 burst) is counted in /metrics, memory stays bounded, and
    commands are refused explicitly; when the database is back everything recovers by itself: every QoS 1 message
    published during the outage is stored and reaches the browser, and a command goes through."""
    run = uuid.uuid4().hex[:6]
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(fresh_database(private_postgres.url, prefix="gateway_faults_pg"))
        token = operator_token(database_url, "faults")
        gateway = DaphneAndBridge(
            database_url,
            private_redis.url,
            mosquitto.port,
            prefix=f"f{run}/devices",
            extra_env={"GATEWAY_MQTT_QUEUE_MAX": str(QUEUE_MAX)},
        )
        stack.callback(gateway.stop, signal.SIGKILL)
        stack.callback(private_postgres.start)  # whatever happens, the module's other cases find it running
        browser, ticker = ticking(stack, gateway, token, mosquitto.port, run, answering=True)
        rss_before = gateway.rss()
        burst_device = f"burst-{run}"

        private_postgres.stop()
        down_at = time.monotonic()
        try:
            time.sleep(1)
            browser.send({"op": "command", "device": ticker.device_id, "name": "reboot", "request_id": "while-down"})
            refusal = wait_for(lambda: browser.error_for("while-down"), timeout=10, what="the command's refusal")
            http_refusal = post_command(gateway.web_port, token, ticker.device_id, "http-while-down")
            publish_burst(mosquitto.port, f"{gateway.prefix}/{burst_device}/telemetry", QOS0_BURST, qos=0)
            wait_for(lambda: gateway.bridge_count("gateway_mqtt_queue_dropped_total") > 0, timeout=10, what="drops")
            ready_while_down = http_ok(f"http://127.0.0.1:{gateway.web_port}/readyz")
            rss_during, back_at, recovery, published = end_outage(
                gateway,
                browser,
                ticker,
                down_at,
                POSTGRES_OUTAGE,
                private_postgres.start,
                "PostgreSQL",
                "every QoS 1 event",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{gateway.logs()}") from None
        dropped = gateway.bridge_count("gateway_mqtt_queue_dropped_total")
        retries = gateway.bridge_count("gateway_store_retries_total")
        burst_stored = len(browser.seqs(burst_device))
        assert refusal["code"] == "unavailable", refusal
        assert browser.commands_by_request("while-down") == [], "the refused command was not stored"
        assert browser.commands_by_request("after") == ["pending", "sent", "succeeded"]
        assert http_refusal[0] == 503 and http_refusal[1].get("error") == "unavailable", http_refusal
        assert not ready_while_down, "/readyz says the database is down"
        assert retries > 0, "the held batch's retries are counted"
        assert burst_stored + dropped == QOS0_BURST, f"every QoS 0 message stored or counted: {burst_stored}+{dropped}"
        growth = check_nothing_lost_and_memory_bounded(browser, database_url, rss_before, rss_during)
    print_figures(
        capsys,
        f"postgresql down {back_at - down_at:.0f} s: commands refused (WebSocket {refusal['code']}, HTTP "
        f"{http_refusal[0]}); a fresh event reached the browser {recovery:.2f} s after PostgreSQL was back; "
        f"{len(published)} QoS 1 events, none lost ({len(browser.gaps())} gap frames, {browser.reconnects} "
        f"reconnects); QoS 0 burst of {QOS0_BURST}: {burst_stored:.0f} stored, {dropped:.0f} dropped and counted; "
        f"{retries:.0f} store retries; RSS growth during the outage (Daphne, bridge) {growth[0]:.1f}, "
        f"{growth[1]:.1f} MiB",
    )
