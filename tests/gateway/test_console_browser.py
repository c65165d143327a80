"""The operator console in a real browser: Debian's Chromium, driven by Playwright, against a real gateway
process (``rungateway``) fed by real MQTT messages through the machine's Mosquitto."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.gateway.browser import BROWSER_MARKS, Gateway, open_console, screenshot
from tests.support import require_mosquitto

pytestmark = BROWSER_MARKS

XSS_IMG = "<img src=x onerror=window.__xss=1>"
XSS_BOLD = "<b>bold</b>"
XSS_SCRIPT = "</script><script>window.__xss=2</script>"


def test_fleet_and_device_pages_update_live(browser, gateway, operator):
    from playwright.sync_api import expect

    with gateway.diagnosed():
        page = open_console(browser, gateway, operator)
        expect(page.locator("#fleet-empty")).to_be_visible()

        # A device the page has never heard of: its first message adds a row.
        gateway.publish("dev-1", "telemetry", {"temp": 21.5})
        row = page.locator('tr[data-device="dev-1"]')
        temp = row.locator('[data-metric="temp"] .value')
        expect(temp).to_have_text("21.5")
        expect(row.locator("[data-online]")).to_have_attribute("data-online", "false")
        expect(page.locator("#fleet-empty")).to_be_hidden()

        gateway.publish("dev-1", "telemetry", {"temp": 22.75})
        expect(temp).to_have_text("22.75")

        gateway.publish("dev-1", "status", "online")
        badge = row.locator("[data-online]")
        expect(badge).to_have_attribute("data-online", "true")
        expect(badge).to_have_text("online")
        expect(row.locator(".col-seen")).to_have_text("just now")

        # A second device with several metrics, so that the screenshot shows a realistic table.
        gateway.publish("dev-2", "telemetry", {"hum": 40.1, "temp": 19, "door": "closed", "gps": {"lat": 48.85}})
        expect(page.locator('tr[data-device="dev-2"] [data-metric="gps.lat"] .value')).to_have_text("48.85")
        expect(page.locator("tbody#fleet-rows > tr")).to_have_count(2)
        expect(page.locator("tbody#fleet-rows > tr").first).to_have_attribute("data-device", "dev-1")
        expect(page.locator("#fleet-summary")).to_have_text("2 devices · 1 online")

        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator("#connection")).to_contain_text("Live")
        screenshot(page, "fleet.png")

        # The device page: state from the server, then live updates on a socket subscribed to that device.
        row.locator("a").first.click()
        expect(page).to_have_url(f"{gateway.url}/devices/dev-1/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator("#presence")).to_have_attribute("data-online", "true")
        expect(page.locator('#metric-rows tr[data-metric="temp"] .value')).to_have_text("22.75")
        events = page.locator("#event-rows > tr")
        expect(events).to_have_count(3)  # two telemetry messages and the status, newest first
        expect(events.first).to_have_attribute("data-type", "status")

        gateway.publish("dev-1", "telemetry", {"temp": 23.5, "hum": 38})
        expect(page.locator('#metric-rows tr[data-metric="temp"] .value')).to_have_text("23.5")
        expect(page.locator('#metric-rows tr[data-metric="hum"] .value')).to_have_text("38")
        door = {"name": "door_open", "severity": "warning", "message": "Door 2 opened", "door": 2}
        gateway.publish("dev-1", "events", door)
        expect(events).to_have_count(5)
        expect(events.first).to_have_attribute("data-type", "event")
        expect(events.first).to_contain_text("Door 2 opened")
        expect(events.first.locator(".event-data")).to_have_text('{"door":2}')
        # Another device's events do not reach this page.
        gateway.publish("dev-2", "events", {"name": "other", "severity": "info"})
        gateway.publish("dev-1", "status", "offline")
        expect(page.locator("#presence")).to_have_attribute("data-online", "false")
        expect(events).to_have_count(6)
        expect(page.locator("#event-rows")).not_to_contain_text("other")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        screenshot(page, "device.png")
        assert not [line for line in gateway.browser_log if line.startswith("page error")], gateway.browser_log


def test_device_strings_are_shown_as_text_never_markup(browser, gateway, operator):
    from playwright.sync_api import expect

    with gateway.diagnosed():
        page = open_console(browser, gateway, operator)

        # Before the device page opens (so it comes from the json_script state) ...
        gateway.publish("dev-x", "telemetry", {"label": XSS_IMG + XSS_BOLD, XSS_BOLD: 1})
        gateway.publish("dev-x", "events", {"name": XSS_BOLD, "severity": "critical", "message": XSS_IMG})
        gateway.publish("dev-x", "events", {"name": "script", "severity": "info", "message": XSS_SCRIPT})
        row = page.locator('tr[data-device="dev-x"]')
        expect(row.locator('[data-metric="label"] .value')).to_have_text(XSS_IMG + XSS_BOLD)
        expect(row).to_contain_text(XSS_BOLD)
        assert page.locator("#fleet img, #fleet b, #fleet script").count() == 0

        page.goto(f"{gateway.url}/devices/dev-x/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        events = page.locator("#event-rows")
        expect(events.locator("> tr")).to_have_count(3)
        expect(events).to_contain_text(XSS_BOLD)
        expect(events).to_contain_text(XSS_IMG)
        expect(events).to_contain_text(XSS_SCRIPT)
        expect(page.locator('#metric-rows tr[data-metric="label"] .value')).to_have_text(XSS_IMG + XSS_BOLD)

        # ... and live, while it is open.
        gateway.publish("dev-x", "events", {"name": XSS_IMG, "severity": "warning", "message": XSS_BOLD})
        gateway.publish("dev-x", "telemetry", {"label": XSS_BOLD + XSS_SCRIPT})
        expect(events.locator("> tr")).to_have_count(5)
        expect(events.locator("> tr").first).to_contain_text(XSS_BOLD + XSS_SCRIPT)
        expect(page.locator('#metric-rows tr[data-metric="label"] .value')).to_have_text(XSS_BOLD + XSS_SCRIPT)
        expect(events.locator('> tr[data-type="event"]').nth(0)).to_contain_text(XSS_IMG)

        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.locator("#events b").count() == 0
        assert page.locator("#events img, #metrics img, #metrics b").count() == 0
        # The page's only scripts are the module and the JSON data block.
        assert page.evaluate("[...document.scripts].map(s => s.type)") == ["application/json", "module"]


def test_console_reconnects_and_resumes_without_loss_or_duplicates(browser, gateway, operator):
    from playwright.sync_api import expect

    with gateway.diagnosed():
        page = open_console(browser, gateway, operator)
        gateway.publish("dev-r", "telemetry", {"n": 0})
        expect(page.locator('tr[data-device="dev-r"] [data-metric="n"] .value')).to_have_text("0")
        page.goto(f"{gateway.url}/devices/dev-r/")
        connection = page.locator("#connection")
        expect(connection).to_have_attribute("data-state", "live")

        last_seen = int(page.locator("#event-rows > tr").first.get_attribute("data-id") or 0)
        frames_before = len(gateway.socket_log)

        # The gateway goes away; the bridge's persistent MQTT session keeps what devices send meanwhile.
        gateway.stop()
        expect(connection).to_have_attribute("data-state", "reconnecting")
        for n in range(1, 6):
            gateway.publish("dev-r", "telemetry", {"n": n})
        gateway.start()

        # The page reconnects by itself and resumes after the last id it saw: every event once, none twice.
        expect(connection).to_have_attribute("data-state", "live", timeout=20_000)
        expect(page.locator('#metric-rows tr[data-metric="n"] .value')).to_have_text("5")
        rows = page.locator('#event-rows > tr[data-type="telemetry"]')
        expect(rows).to_have_count(6)
        shown = rows.locator('[class="value"]').all_text_contents()
        assert shown == ["5", "4", "3", "2", "1", "0"], shown
        ids = page.locator("#event-rows > tr").evaluate_all("rows => rows.map(row => Number(row.dataset.id))")
        assert ids == sorted(set(ids), reverse=True), ids
        sent = [json.loads(line[2:]) for line in gateway.socket_log[frames_before:] if line.startswith("> ")]
        resubscribed = [frame for frame in sent if frame.get("op") == "subscribe"]
        assert resubscribed == [{"op": "subscribe", "devices": ["dev-r"], "after": last_seen}], resubscribed


def sent_frames(gateway: Gateway, op: str) -> list[dict]:
    """The frames with this ``op`` that the page has sent on its WebSockets so far."""
    sent = (json.loads(line[2:]) for line in gateway.socket_log if line.startswith("> "))
    return [frame for frame in sent if frame.get("op") == op]


@dataclass
class FakeDevice:
    """A device on MQTT that answers every command it receives with ``{"rebooted": true}``."""

    client: object
    replies_topic: str
    received: list[tuple[str, dict]] = field(default_factory=list)

    def on_message(self, client, userdata, message) -> None:
        payload = json.loads(message.payload)
        self.received.append((message.topic, payload))
        reply = {"id": payload.get("id"), "ok": True, "result": {"rebooted": True}}
        client.publish(self.replies_topic, json.dumps(reply), qos=1)


@contextlib.contextmanager
def fake_device(gateway: Gateway, device: str) -> Iterator[FakeDevice]:
    import threading

    from paho.mqtt.client import Client
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = require_mosquitto()
    client = Client(CallbackAPIVersion.VERSION2, client_id=f"console-test-dev-{uuid.uuid4().hex[:10]}")
    fake = FakeDevice(client=client, replies_topic=f"{gateway.prefix}/{device}/replies")
    subscribed = threading.Event()
    client.on_message = fake.on_message
    client.on_connect = lambda c, *_: c.subscribe(f"{gateway.prefix}/{device}/commands/+", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    try:
        assert subscribed.wait(5), "the fake device could not subscribe to its commands"
        yield fake
    finally:
        client.loop_stop()
        client.disconnect()


def test_send_a_command_from_the_device_page(browser, gateway, operator):
    from playwright.sync_api import expect

    with gateway.diagnosed(), fake_device(gateway, "dev-c") as device:
        page = open_console(browser, gateway, operator)
        gateway.publish("dev-c", "status", "online")
        expect(page.locator('tr[data-device="dev-c"] [data-online]')).to_have_attribute("data-online", "true")
        page.goto(f"{gateway.url}/devices/dev-c/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator("#commands-empty")).to_be_visible()

        # Params that are not a JSON object: an inline error, and nothing leaves the page.
        page.fill("#command-name", "reboot")
        page.fill("#command-params", "[1, 2]")
        page.click("#command-send")
        expect(page.locator("#command-error")).to_be_visible()
        expect(page.locator("#command-error")).to_contain_text("must be a JSON object")
        expect(page.locator("#command-params")).to_have_attribute("aria-invalid", "true")
        page.wait_for_timeout(300)
        assert sent_frames(gateway, "command") == []
        expect(page.locator("#command-rows > tr")).to_have_count(0)

        # A valid command: the device gets it once, replies, and the table follows it to succeeded.
        page.fill("#command-params", '{"delay": 1}')
        page.click("#command-send")
        row = page.locator("#command-rows > tr").filter(has_text="reboot")
        expect(row).to_have_count(1)
        expect(row.locator(".state")).to_have_text("succeeded")
        expect(row.locator(".outcome")).to_contain_text("rebooted")
        expect(row).to_have_attribute("data-state", "succeeded")
        expect(page.locator("#command-error")).to_be_hidden()
        expect(page.locator("#command-send")).to_be_enabled()

        page.wait_for_timeout(500)  # time for a duplicate publication to show up, if there were one
        assert len(device.received) == 1, device.received
        topic, payload = device.received[0]
        assert topic == f"{gateway.prefix}/dev-c/commands/reboot"
        assert payload["params"] == {"delay": 1}
        assert {"id", "ts", "expires", "ttl"} <= payload.keys(), payload
        assert payload["expires"] > payload["ts"] and payload["ttl"] > 0, payload
        assert row.get_attribute("data-command-id") == payload["id"]
        sent = sent_frames(gateway, "command")
        assert len(sent) == 1, sent
        assert sent[0]["name"] == "reboot" and sent[0]["params"] == {"delay": 1} and sent[0]["request_id"], sent

        screenshot(page, "device-command.png")
        assert not [line for line in gateway.browser_log if line.startswith("page error")], gateway.browser_log


def test_a_command_sent_while_disconnected_goes_out_once_on_reconnect(browser, gateway, operator):
    from playwright.sync_api import expect

    with gateway.diagnosed(), fake_device(gateway, "dev-q") as device:
        page = open_console(browser, gateway, operator)
        gateway.publish("dev-q", "status", "online")
        expect(page.locator('tr[data-device="dev-q"] [data-online]')).to_have_attribute("data-online", "true")
        page.goto(f"{gateway.url}/devices/dev-q/")
        connection = page.locator("#connection")
        expect(connection).to_have_attribute("data-state", "live")

        gateway.stop()
        expect(connection).to_have_attribute("data-state", "reconnecting")
        page.fill("#command-name", "reboot")
        page.click("#command-send")
        expect(page.locator("#command-status")).to_contain_text("Not connected")
        expect(page.locator("#command-send")).to_be_disabled()
        page.click("#command-send", force=True)  # an impatient second click changes nothing
        gateway.start()

        expect(connection).to_have_attribute("data-state", "live", timeout=20_000)
        row = page.locator("#command-rows > tr")
        expect(row).to_have_count(1)
        expect(row.locator(".state")).to_have_text("succeeded")
        expect(page.locator("#command-send")).to_be_enabled()
        page.wait_for_timeout(500)
        assert [payload["params"] for _, payload in device.received] == [{}], device.received
        commands = sent_frames(gateway, "command")
        assert len(commands) == 1 and commands[0]["request_id"], commands


# Records every CSP violation the page reports (Playwright's init scripts are not subject to the page's policy).
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.effectiveDirective} blocked ${event.blockedURI || "inline"}`);
});
"""
ADMIN_PAGES = [
    "/admin/",
    "/admin/devices/device/",
    "/admin/devices/device/dev-p/change/",
    "/admin/devices/fleet/add/",
    "/admin/devices/command/",
    "/admin/auth/group/add/",
    "/admin/auth/user/",
]


def test_console_and_admin_run_under_the_content_security_policy(browser, gateway, operator):
    from playwright.sync_api import expect

    from tests.gateway.test_security import CSP

    with gateway.diagnosed():
        page = open_console(browser, gateway, operator)
        page.add_init_script(RECORD_CSP_VIOLATIONS)
        gateway.publish("dev-p", "telemetry", {"temp": 20.5, "label": XSS_IMG})
        gateway.publish("dev-p", "status", "online")

        # The fleet page, fetched again so that the recorder runs from its first line.
        response = page.goto(f"{gateway.url}/")
        assert response is not None and response.headers.get("content-security-policy") == CSP, response.headers
        # connect-src 'self' must let the page open its WebSocket to the same host (ws:, not listed explicitly).
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator('tr[data-device="dev-p"] [data-metric="temp"] .value')).to_have_text("20.5")
        assert page.evaluate("window.__cspViolations") == []

        # The device page and its command form (a fetch-free WebSocket op).
        response = page.goto(f"{gateway.url}/devices/dev-p/")
        assert response is not None and response.headers.get("content-security-policy") == CSP
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator('#metric-rows tr[data-metric="label"] .value')).to_have_text(XSS_IMG)
        page.fill("#command-name", "reboot")
        page.click("#command-send")
        expect(page.locator("#command-rows > tr")).to_have_count(1)
        assert page.evaluate("window.__cspViolations") == []
        assert page.evaluate("typeof window.__xss") == "undefined"

        # Django's admin runs under the same policy (Django 5.2's admin has no inline scripts or styles).
        for path in ADMIN_PAGES:
            response = page.goto(f"{gateway.url}{path}")
            assert response is not None and response.status == 200, path
            assert response.headers.get("content-security-policy") == CSP, path
            page.wait_for_load_state("networkidle")
            assert page.evaluate("window.__cspViolations") == [], path

        complaints = [
            line
            for line in gateway.browser_log
            if "content security policy" in line.lower() or "refused" in line.lower()
        ]
        assert complaints == [], complaints
        assert not [line for line in gateway.browser_log if line.startswith("page error")], gateway.browser_log
