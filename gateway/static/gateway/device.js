// The device page: facts and alerts, history charts, the command panel, latest values and the event log, all
// kept live by a socket subscribed to this one device. After a gap it reloads everything it shows over HTTP.

import { ChartPanel } from "./charts.js";
import { CommandPanel } from "./commands.js";
import { EventLog } from "./eventlog.js";
import { DeviceModel } from "./model.js";
import { RenderScheduler, el, formatValue, plural, setBadge, setText, setTime } from "./dom.js";

const CLOCK_INTERVAL_MS = 5_000;
const REFRESH_INTERVAL_MS = 30_000; // alerts age out and other operators acknowledge them: re-read the device

export class DevicePage {
  constructor({ config, api, state }) {
    this.config = config;
    this.api = api;
    const entry = state.device || {};
    this.device = new DeviceModel(String(entry.id));
    this.device.applySnapshot(entry, Number.isInteger(state.last_id) ? state.last_id : 0);
    this.lastId = Number.isInteger(state.last_id) ? state.last_id : 0;
    this.presence = document.getElementById("presence");
    this.lastSeen = document.getElementById("last-seen");
    this.alertState = document.getElementById("alert-state");
    this.ackButton = document.getElementById("alert-ack");
    this.ackStatus = document.getElementById("alert-status");
    this.metricBody = document.getElementById("metric-rows");
    this.metricsEmpty = document.getElementById("metrics-empty");
    this.notice = document.getElementById("device-notice");
    this.metricRows = new Map(); // metric -> {tr, value, when}
    this.metricsKey = null; // nothing rendered yet: the first render also shows or hides "No telemetry yet"
    this.scheduler = new RenderScheduler(() => this.flush());
    const requestRender = () => this.scheduler.request();
    this.commands = new CommandPanel(this.device.id, state.commands, requestRender);
    this.log = new EventLog({
      api,
      deviceId: this.device.id,
      root: document.getElementById("event-log"),
      initial: state.events,
    });
    const chartRoot = document.getElementById("charts");
    this.charts = new ChartPanel({ root: chartRoot, api, device: this.device, requestRender });
    this.charts.start({ moduleUrl: chartRoot.dataset.uplotModule, cssUrl: chartRoot.dataset.uplotCss });
    this.ackButton.addEventListener("click", () => this.acknowledge());
    this.flush();
    if (typeof entry.alerting !== "boolean") this.refresh();
    setInterval(() => this.tickClock(), CLOCK_INTERVAL_MS);
    setInterval(() => document.hidden || this.refresh(), REFRESH_INTERVAL_MS);
  }

  get subscription() {
    return [this.device.id];
  }

  /** The socket subscribes after the state the page was rendered with. */
  start() {
    return Promise.resolve(this.lastId);
  }

  attach(socket) {
    this.commands.attach(socket);
  }

  onEvent(frame) {
    if (frame.device !== this.device.id) return;
    this.device.apply(frame);
    if (frame.type === "command") this.commands.apply(frame);
    if (frame.type === "telemetry") this.charts.onTelemetry(frame);
    this.log.add(frame);
    this.scheduler.request();
  }

  onError(frame) {
    if (frame.code === "unknown_device" && frame.ref === undefined) {
      this.showNotice("This device no longer exists or you may no longer see it: updates have stopped.");
    }
  }

  showNotice(text) {
    this.notice.textContent = text;
    this.notice.hidden = false;
  }

  flush() {
    setBadge(this.presence, this.device.online);
    setTime(this.lastSeen, this.device.lastSeen);
    this.renderAlerts();
    this.renderMetrics();
    this.log.render();
    this.commands.render();
    this.charts.render();
  }

  tickClock() {
    setTime(this.lastSeen, this.device.lastSeen);
    for (const [metric, row] of this.metricRows) setTime(row.when, this.device.values.get(metric).ts);
  }

  renderAlerts() {
    const { alerting, alerts } = this.device;
    this.alertState.dataset.alerting = String(alerting);
    setText(this.alertState, alerting ? `${plural(alerts, "unacknowledged alert")} in the last hour` : "none");
    this.ackButton.hidden = !alerting;
  }

  renderMetrics() {
    const metrics = this.device.sortedMetrics();
    const key = metrics.join("\u0000");
    if (key !== this.metricsKey) {
      const rows = metrics.map((metric) => {
        let row = this.metricRows.get(metric);
        if (!row) {
          const tr = el("tr");
          tr.setAttribute("data-metric", metric);
          const name = el("th", "metric", metric);
          name.setAttribute("scope", "row");
          const value = el("td", "value");
          const when = el("td", "when");
          tr.append(name, value, when);
          row = { tr, value, when };
          this.metricRows.set(metric, row);
        }
        return row.tr;
      });
      this.metricBody.replaceChildren(...rows);
      this.metricsKey = key;
      this.metricsEmpty.hidden = metrics.length > 0;
    }
    for (const [metric, row] of this.metricRows) {
      const entry = this.device.values.get(metric);
      setText(row.value, formatValue(entry.value));
      setTime(row.when, entry.ts);
    }
  }

  /** Re-read the device (presence, values, alerts) over HTTP; returns the answer, or null when it failed. */
  async refresh() {
    try {
      const answer = await this.api.device(this.device.id, { retries: 0 });
      const snapshotId = Number.isInteger(answer.last_id) ? answer.last_id : 0;
      this.device.applySnapshot(answer.device || {}, snapshotId);
      this.scheduler.request();
      return answer;
    } catch (error) {
      if (error.status === 404) this.showNotice("This device no longer exists or you may no longer see it.");
      else console.warn("gateway: could not re-read the device", error);
      return null;
    }
  }

  async acknowledge() {
    this.ackButton.disabled = true;
    setText(this.ackStatus, "");
    try {
      const answer = await this.api.acknowledge(this.device.id);
      this.device.acknowledged(answer.device);
      setText(this.ackStatus, `${plural(answer.acknowledged ?? 0, "alert")} acknowledged.`);
      this.log.reload(); // the log shows who acknowledged what
    } catch (error) {
      if (error.name !== "SignedOut") setText(this.ackStatus, `Could not acknowledge: ${error.message}`);
    } finally {
      this.ackButton.disabled = false;
      this.scheduler.request();
    }
  }

  /** Events from..to were lost on the way: reload the device, its recent commands, the log and the charts. */
  async reload(from, to) {
    const answer = await this.refresh();
    for (const frame of Array.isArray(answer?.commands) ? answer.commands : []) this.commands.apply(frame);
    this.charts.reload();
    await this.log.gap(from, to);
    this.scheduler.request();
  }
}
