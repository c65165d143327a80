"""The device page in a real browser: history charts drawn from the API with live points appended, the time ranges,
the event log's severity filters, acknowledging alerts, and the reload after a gap."""

from __future__ import annotations

import time

import pytest

from tests.gateway.browser import (
    BROWSER_MARKS,
    observation,
    open_console,
    require_chart_library,
    screenshot,
    store,
    wait_until,
)

pytestmark = BROWSER_MARKS

MINUTE = 60
# Chart points of one metric, and whether its canvas has anything drawn on it.
CHART_STATE = """metric => {
  const figure = document.querySelector(`#charts figure[data-metric="${metric}"]`);
  if (!figure) return null;
  const canvas = figure.querySelector("canvas");
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let inked = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) inked += 1;
  return {points: Number(figure.dataset.points), last: figure.dataset.last, inked};
}"""
LOCAL_INPUT = """ts => {
  const d = new Date(ts * 1000), p = n => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}"""


@pytest.fixture
def history(gateway) -> float:
    """Two hours of ``dev-h`` telemetry, one message a minute (temp rises 0.1 a minute; mode is not a number)."""
    now = time.time()
    store(
        *(
            observation(
                "dev-h",
                "telemetry",
                {"values": {"temp": 20 + k / 10, "hum": 40 + k % 10, "mode": "auto"}},
                now - (120 - k) * MINUTE,
            )
            for k in range(120)
        ),
        observation("dev-h", "status", {"online": True}, now - 1),
    )
    return now


def chart(page, metric: str) -> dict:
    return page.evaluate(CHART_STATE, metric)


def points_become(page, metric: str, low: int, high: int) -> int:
    script = f"() => {{ const c = ({CHART_STATE})({metric!r}); return c && c.points >= {low} && c.points <= {high} }}"
    wait_until(page, script)
    return chart(page, metric)["points"]


def test_charts_draw_history_and_append_live_points(history, browser, gateway, operator):
    from playwright.sync_api import expect

    require_chart_library()
    with gateway.diagnosed():
        page = open_console(browser, gateway, operator)
        page.goto(f"{gateway.url}/devices/dev-h/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        figures = page.locator("#charts figure.chart")
        expect(figures).to_have_count(2)  # hum and temp; mode is a string
        assert figures.evaluate_all("fs => fs.map(f => f.dataset.metric)") == ["hum", "temp"]

        # 1 h (the default): the last hour of history, drawn.
        expect(page.locator('button[data-range="1h"]')).to_have_attribute("aria-pressed", "true")
        points = points_become(page, "temp", 58, 61)
        drawn = chart(page, "temp")
        assert drawn["last"] == "31.9" and drawn["inked"] > 500, drawn

        # A live point is appended without a reload, and the chart is drawn again.
        gateway.publish("dev-h", "telemetry", {"temp": 99.5, "hum": 45})
        wait_until(page, f"() => ({CHART_STATE})('temp').last === '99.5'")
        assert chart(page, "temp")["points"] == points + 1

        # Ranges: 24 h holds everything (raw: fewer points than buckets), live the last 15 minutes.
        page.click('button[data-range="24h"]')
        expect(page.locator('button[data-range="24h"]')).to_have_attribute("aria-pressed", "true")
        points_become(page, "temp", 121, 121)
        page.click('button[data-range="live"]')
        points_become(page, "temp", 15, 17)
        gateway.publish("dev-h", "telemetry", {"temp": 12.25})
        wait_until(page, f"() => ({CHART_STATE})('temp').last === '12.25'")
        page.click('button[data-range="7d"]')
        points_become(page, "temp", 122, 122)
        page.click('button[data-range="1h"]')
        points_become(page, "temp", points + 1, points + 2)
        screenshot(page, "device-charts.png")

        # Custom: the first half hour of the history; a range in the past gets no live points.
        page.click('button[data-range="custom"]')
        expect(page.locator(".chart-custom")).to_be_visible()
        start, end = history - 121 * MINUTE, history - 90 * MINUTE
        page.fill("#chart-from", page.evaluate(LOCAL_INPUT, start))
        page.fill("#chart-to", page.evaluate(LOCAL_INPUT, end))
        page.click(".chart-custom button[type=submit]")
        custom = points_become(page, "temp", 28, 33)
        gateway.publish("dev-h", "telemetry", {"temp": 1.5})
        expect(page.locator('#metric-rows tr[data-metric="temp"] .value')).to_have_text("1.5")
        page.wait_for_timeout(400)  # a render or two later
        assert chart(page, "temp")["points"] == custom

        # An end before the start is refused in place.
        page.fill("#chart-to", page.evaluate(LOCAL_INPUT, start - 3600))
        page.click(".chart-custom button[type=submit]")
        expect(page.locator("#chart-to")).to_have_attribute("aria-invalid", "true")
        expect(page.locator(".chart-note")).to_contain_text("must be after its start")
        assert not [line for line in gateway.browser_log if line.startswith("page error")], gateway.browser_log


@pytest.fixture
def events_history(gateway) -> None:
    """``dev-e``: an old critical alert, a warning and an info event, then 60 telemetry messages (the newest 50
    events the page starts from are all telemetry)."""
    now = time.time()
    store(
        observation("dev-e", "event", {"name": "overheat", "severity": "critical", "message": "92 C"}, now - 1800),
        observation("dev-e", "event", {"name": "door", "severity": "warning"}, now - 1700),
        observation("dev-e", "event", {"name": "boot", "severity": "info"}, now - 1600),
        *(observation("dev-e", "telemetry", {"values": {"n": k}}, now - 1500 + k) for k in range(60)),
    )


def kinds_shown(page) -> list[str]:
    return page.locator("#event-rows > tr:visible").evaluate_all("rows => rows.map(row => row.dataset.kind)")


def test_event_log_filters_by_severity_and_alerts_are_acknowledged_without_charts(
    events_history, browser, gateway, operator
):
    from playwright.sync_api import expect

    with gateway.diagnosed():
        page = open_console(browser, gateway, operator)
        # Without the chart library (not fetched), the page says so and everything else works.
        page.route("**/static/gateway/vendor/**", lambda route: route.fulfill(status=404, body="not found"))
        page.goto(f"{gateway.url}/devices/dev-e/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator(".chart-note")).to_have_text(
            "Charts are unavailable: the chart library is not installed on this gateway."
        )
        expect(page.locator('button[data-range="1h"]')).to_be_disabled()
        rows = page.locator("#event-rows > tr")
        expect(rows).to_have_count(50)
        assert set(kinds_shown(page)) == {"telemetry"}
        expect(page.locator("#alert-state")).to_have_text("2 unacknowledged alerts in the last hour")

        # Only alerts: the log asks the server for warning and critical events, older ones included.
        for kind in ("telemetry", "status", "command", "info"):
            page.locator(f'.log-filters input[value="{kind}"]').uncheck()
        expect(rows).to_have_count(2)
        assert kinds_shown(page) == ["warning", "critical"]
        page.locator('.log-filters input[value="warning"]').press("Space")  # keyboard works too
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("overheat")
        expect(rows.first).to_contain_text("92 C")
        expect(page.locator(".log-older")).to_be_hidden()  # fewer than a page of them

        # Live events follow the filter.
        gateway.publish("dev-e", "events", {"name": "door", "severity": "warning"})
        gateway.publish("dev-e", "events", {"name": "smoke", "severity": "critical"})
        expect(rows).to_have_count(2)
        assert kinds_shown(page) == ["critical", "critical"]
        expect(rows.first).to_contain_text("smoke")
        expect(page.locator("#alert-state")).to_have_text("4 unacknowledged alerts in the last hour")

        # Acknowledge: the alerts go, and the log says who acknowledged each.
        page.click("#alert-ack")
        expect(page.locator("#alert-status")).to_have_text("4 alerts acknowledged.")
        expect(page.locator("#alert-state")).to_have_text("none")
        expect(page.locator("#alert-ack")).to_be_hidden()
        expect(rows.locator(".event-ack")).to_have_count(2)
        expect(rows.first.locator(".event-ack")).to_have_text("acknowledged by operator")
        screenshot(page, "device-events.png")

        # Every kind again: the newest events of every kind, from the server.
        for kind in ("telemetry", "status", "command", "info", "warning"):
            page.locator(f'.log-filters input[value="{kind}"]').check()
        expect(rows).to_have_count(50)
        assert kinds_shown(page)[:2] == ["critical", "warning"]
        page.locator('.log-filters input[value="telemetry"]').uncheck()  # hidden in place, no request
        expect(page.locator("#event-rows > tr:visible")).to_have_count(2)
        assert not [line for line in gateway.browser_log if line.startswith("page error")], gateway.browser_log


def test_after_a_gap_the_device_page_reloads_values_alerts_and_events(browser, gateway, operator):
    from playwright.sync_api import expect

    with gateway.diagnosed():
        page = open_console(browser, gateway, operator)
        gateway.publish("dev-g", "telemetry", {"n": 0})
        expect(page.locator('tr[data-device="dev-g"]')).to_be_visible()  # stored (registered) before its page opens
        page.goto(f"{gateway.url}/devices/dev-g/")
        connection = page.locator("#connection")
        expect(connection).to_have_attribute("data-state", "live")
        expect(page.locator("#event-rows > tr")).to_have_count(1)

        # The gateway restarts with a replay cap of 3 while 9 events happen: the page gets a gap and reloads.
        gateway.stop()
        expect(connection).to_have_attribute("data-state", "reconnecting")
        expect(page.locator("#connection-banner")).to_be_visible()
        expect(page.locator("#connection-banner")).to_contain_text("Disconnected from the gateway")
        for n in range(1, 9):
            gateway.publish("dev-g", "telemetry", {"n": n})
        gateway.publish("dev-g", "events", {"name": "leak", "severity": "critical"})
        gateway.env["GATEWAY_REPLAY_MAX"] = "3"
        gateway.start()

        expect(connection).to_have_attribute("data-state", "live", timeout=20_000)
        expect(page.locator("#connection-banner")).to_be_hidden()
        expect(page.locator("#event-rows > tr.gap-note")).to_have_count(1)
        expect(page.locator("#event-rows > tr.gap-note")).to_contain_text("were missed here")
        expect(page.locator('#event-rows > tr[data-type="telemetry"]')).to_have_count(9)  # n = 0..8, from history
        expect(page.locator('#metric-rows tr[data-metric="n"] .value')).to_have_text("8")
        expect(page.locator("#alert-state")).to_have_text("1 unacknowledged alert in the last hour")
        assert any('"type":"gap"' in line for line in gateway.socket_log), gateway.socket_log[-20:]
