"""What the console's browser tests share: a real gateway process (``rungateway``) fed by real MQTT messages through
the machine's Mosquitto, a logged-in operator, and Debian's Chromium driven by Playwright.

The fixtures are offered to the tests of this folder by ``tests/gateway/conftest.py``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    ROOT,
    GatewayProcess,
    free_port,
    gateway_env,
    http_ok,
    manage,
    require,
    require_chromium,
    require_mosquitto,
    wait_for,
)

# Every browser test module marks itself with these.
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.mosquitto,
    pytest.mark.django_db(transaction=True),
]

ARTIFACTS = Path(os.environ.get("GATEWAY_TEST_ARTIFACTS") or ROOT / "test-artifacts")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXPECT_TIMEOUT_MS = 10_000
CHART_LIBRARY = ROOT / "gateway" / "static" / "gateway" / "vendor" / "uplot" / "uPlot.esm.js"


@dataclass
class Gateway:
    """A running ``rungateway`` with its own topic prefix, an MQTT publisher and the browser's console."""

    port: int
    prefix: str
    env: dict[str, str]
    publisher: object
    processes: list[GatewayProcess] = field(default_factory=list)
    browser_log: list[str] = field(default_factory=list)
    socket_log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> GatewayProcess:
        return self.processes[-1]

    def start(self) -> None:
        process = GatewayProcess(
            manage("rungateway", "--bind", f"127.0.0.1:{self.port}"), self.env, name="console-gateway"
        ).start()
        self.processes.append(process)
        try:
            wait_for(lambda: http_ok(f"{self.url}/healthz") or not process.alive(), timeout=20, what="/healthz")
            assert process.alive(), "the gateway exited during start-up"
            # Ready means the bridge has subscribed: only then is a message published by the test received.
            wait_for(lambda: http_ok(f"{self.url}/readyz"), timeout=15, what="/readyz (bridge connected)")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- gateway log ---\n{process.log()}") from exc

    def stop(self) -> None:
        if self.processes:
            self.process.kill(signal.SIGTERM)

    def log(self) -> str:
        return "\n--- restarted ---\n".join(process.log() for process in self.processes)

    def publish(self, device: str, channel: str, payload: object) -> None:
        body = payload if isinstance(payload, str) else json.dumps(payload)
        info = self.publisher.publish(f"{self.prefix}/{device}/{channel}", body, qos=1)  # type: ignore[attr-defined]
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"publish to {device}/{channel} was not acknowledged (rc {info.rc})"

    @contextlib.contextmanager
    def diagnosed(self) -> Iterator[None]:
        """Re-raise any failure with the gateway's log and the browser console attached."""
        try:
            yield
        except Exception as exc:
            browser = "\n".join(self.browser_log[-50:]) or "(nothing)"
            frames = "\n".join(self.socket_log[-40:]) or "(nothing)"
            raise AssertionError(
                f"{type(exc).__name__}: {exc}\n\n--- browser console ---\n{browser}"
                f"\n\n--- WebSocket frames (last 40) ---\n{frames}"
                f"\n\n--- gateway log ---\n{self.log()[-15_000:]}"
            ) from exc

    def watch(self, page) -> None:
        """Record the page's console and its WebSocket frames, for failure messages."""
        log, frames = self.browser_log, self.socket_log

        def on_socket(ws) -> None:
            frames.append(f"open {ws.url}")
            ws.on("framesent", lambda payload: frames.append(f"> {str(payload)[:300]}"))
            ws.on("framereceived", lambda payload: frames.append(f"< {str(payload)[:300]}"))
            ws.on("close", lambda _: frames.append("closed"))

        page.on("console", lambda message: log.append(f"console.{message.type}: {message.text}"))
        page.on("pageerror", lambda error: log.append(f"page error: {error}"))
        page.on("websocket", on_socket)


@pytest.fixture
def operator(transactional_db) -> tuple[str, str]:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    password = uuid.uuid4().hex
    user = get_user_model().objects.create_superuser(username="operator", email="", password=password)
    # tests.settings hashes with MD5 for speed, but the gateway subprocess runs config.settings, which does not
    # accept MD5 hashes: store a hash it can check.
    hasher = PBKDF2PasswordHasher()
    user.password = hasher.encode(password, hasher.salt())
    user.save(update_fields=["password"])
    return "operator", password


@pytest.fixture
def gateway(transactional_db) -> Iterator[Gateway]:
    from paho.mqtt.client import Client
    from paho.mqtt.enums import CallbackAPIVersion

    host, mqtt_port = require_mosquitto()
    require_chromium()  # before starting anything: skip (or fail in CI) early
    tag = uuid.uuid4().hex[:10]
    env = gateway_env(
        MQTT_URL=f"mqtt://{host}:{mqtt_port}",
        GATEWAY_MQTT_CLIENT_ID=f"console-test-{tag}",
        GATEWAY_TOPIC_PREFIX=f"t{tag}/devices",
    )
    publisher = Client(CallbackAPIVersion.VERSION2, client_id=f"console-test-pub-{tag}")
    gateway = Gateway(port=free_port(), prefix=f"t{tag}/devices", env=env, publisher=publisher)
    try:
        gateway.start()
        publisher.connect(host, mqtt_port)
        publisher.loop_start()
        yield gateway
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        gateway.stop()


@pytest.fixture
def browser(operator, gateway):
    # Started after the database work of the other fixtures: Playwright's sync API runs an event loop in this
    # thread, and Django refuses ORM calls while one runs.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=require_chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def open_console(browser, gateway: Gateway, operator: tuple[str, str]):
    """A page logged in through the login form, on the fleet page."""
    from playwright.sync_api import expect

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(EXPECT_TIMEOUT_MS)
    gateway.watch(page)
    page.goto(f"{gateway.url}/")
    expect(page).to_have_url(f"{gateway.url}/login/?next=/")
    username, password = operator
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("form.form button[type=submit]")
    expect(page).to_have_url(f"{gateway.url}/")
    expect(page.locator("header")).to_contain_text("IoT Gateway")
    expect(page.locator("header .user")).to_have_text(username)
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    return page


def screenshot(page, name: str) -> Path:
    """A full-page screenshot kept as a test artifact (in GATEWAY_TEST_ARTIFACTS, default test-artifacts/)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def store(*observations: object) -> None:
    """Store observations as the bridge would (history for the pages to load), in one batch."""
    from devices import services

    services.ingest(observations=observations, auto_register=True, max_devices=100_000)  # type: ignore[arg-type]


def observation(device: str, kind: str, body: dict, at: float) -> object:
    from devices.records import EventKind, Observation

    return Observation(device_id=device, kind=EventKind(kind), received_at=at, body=body)


def wait_until(page, script: str, arg: object = None, timeout_ms: int = EXPECT_TIMEOUT_MS) -> Any:
    """Wait until ``script`` (a function of ``arg``) is truthy in the page; returns its value."""
    return page.wait_for_function(script, arg=arg, timeout=timeout_ms).json_value()


def require_chart_library() -> None:
    """The charts need uPlot, which scripts/test fetches (scripts/fetch_vendor.py) before running pytest."""
    require("uPlot, the console's chart library,", CHART_LIBRARY.is_file(), "fetch it: python scripts/fetch_vendor.py")
