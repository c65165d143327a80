// The device page's history charts: one uPlot chart per numeric metric, drawn from the history API
// (GET /api/devices/<id>/telemetry) for a time range, with live telemetry appended as it arrives.
//
// uPlot is fetched by scripts/fetch_vendor.py into static/gateway/vendor/ and loaded with a dynamic import, so
// that a missing library costs the page its charts and nothing else.

import { LoadProgress, el, plural } from "./dom.js";

const RANGES = { live: 15 * 60, "1h": 3600, "24h": 86_400, "7d": 7 * 86_400 }; // seconds before now
const RANGE_LABELS = {
  live: "the last 15 minutes",
  "1h": "the last hour",
  "24h": "the last 24 hours",
  "7d": "the last 7 days",
};
const CHARTS_MAX = 12;
const POINTS_MAX = 5_000; // per chart, whatever the range: memory stays bounded however long the page stays open
const BUCKETS_MAX = 1_000;
const CHART_HEIGHT = 180;
const SLIDE_INTERVAL_MS = 1_000;
const GAP_FACTOR = 2.5; // two bucketed points further apart than this many buckets are not joined by a line

/** The uPlot constructor, or null when the library is not installed (the page then says so). */
async function loadUplot(moduleUrl, cssUrl) {
  if (!moduleUrl) return null;
  try {
    const module = await import(moduleUrl);
    if (cssUrl && !document.querySelector(`link[data-vendor="uplot"]`)) {
      const link = el("link");
      link.rel = "stylesheet";
      link.href = cssUrl;
      link.dataset.vendor = "uplot";
      document.head.append(link);
    }
    return module.default;
  } catch (error) {
    console.warn("gateway: the chart library could not be loaded; charts are off", error);
    return null;
  }
}

/**
 * The numbers of one metric's history: time, and each point's min, mean, max and count. Raw points (`bucket` null)
 * have min = mean = max; bucketed ones (`bucket` seconds wide) also take live points into their last bucket, so a
 * long range stays as many points as it has buckets however long the page stays open.
 */
class Series {
  constructor(bucket = null) {
    this.bucket = bucket;
    this.t = [];
    this.min = [];
    this.mean = [];
    this.max = [];
    this.count = [];
  }

  get length() {
    return this.t.length;
  }

  /** Fill from an API series ({t, min, max, mean, count}); when bucketed, a null point breaks the line at holes. */
  static fromApi(api, bucket) {
    const series = new Series(bucket || null);
    const t = Array.isArray(api?.t) ? api.t : [];
    for (let i = 0; i < t.length; i += 1) {
      if (bucket && i > 0 && t[i] - t[i - 1] > GAP_FACTOR * bucket) series.push(t[i - 1] + bucket, null, null, null, 0);
      series.push(t[i], api.min?.[i] ?? null, api.mean?.[i] ?? null, api.max?.[i] ?? null, api.count?.[i] ?? 1);
    }
    return series;
  }

  push(t, min, mean, max, count) {
    this.t.push(t);
    this.min.push(min);
    this.mean.push(mean);
    this.max.push(max);
    this.count.push(count);
  }

  /** Add one live value in time order (it almost always goes at the end). */
  insert(t, value) {
    const last = this.t.length - 1;
    if (this.bucket && last >= 0 && this.mean[last] !== null && t >= this.t[last]) {
      const offset = Math.floor((t - this.t[last]) / this.bucket) * this.bucket;
      if (offset === 0) return this.merge(last, value);
      t = this.t[last] + offset; // the start of its bucket, on the history's grid
    }
    let at = this.t.length;
    while (at > 0 && this.t[at - 1] > t) at -= 1;
    this.t.splice(at, 0, t);
    this.min.splice(at, 0, value);
    this.mean.splice(at, 0, value);
    this.max.splice(at, 0, value);
    this.count.splice(at, 0, 1);
  }

  merge(at, value) {
    const n = this.count[at];
    this.min[at] = Math.min(this.min[at], value);
    this.max[at] = Math.max(this.max[at], value);
    this.mean[at] = (this.mean[at] * n + value) / (n + 1);
    this.count[at] = n + 1;
  }

  /** Drop points before `start`, and the oldest beyond POINTS_MAX. */
  trim(start) {
    let drop = 0;
    while (drop < this.t.length && this.t[drop] < start) drop += 1;
    drop = Math.max(drop, this.t.length - POINTS_MAX);
    if (drop <= 0) return;
    for (const column of [this.t, this.min, this.mean, this.max, this.count]) column.splice(0, drop);
  }

  lastValue() {
    for (let i = this.mean.length - 1; i >= 0; i -= 1) if (this.mean[i] !== null) return this.mean[i];
    return null;
  }

  data() {
    return [this.t, this.min, this.mean, this.max];
  }
}

/** One metric's chart: history first, then live points (those that arrive while history loads wait for it). */
class MetricChart {
  constructor(uPlot, metric, container, window) {
    this.metric = metric;
    this.window = window; // {start, end}, shared with the panel
    this.series = new Series();
    this.loading = true;
    this.waiting = []; // live points that arrived during the history load: {id, t, value}
    this.asOf = 0; // history reflects every event up to this id
    this.dirty = true;
    this.figure = el("figure", "chart");
    this.figure.dataset.metric = metric;
    this.figure.dataset.points = "0";
    this.figure.append(el("figcaption", "chart-title", metric));
    const plot = el("div", "chart-plot");
    plot.setAttribute("role", "img");
    this.figure.append(plot);
    container.append(this.figure);
    this.plot = new uPlot(this.options(plot.clientWidth || container.clientWidth || 400), this.series.data(), plot);
    this.plotHolder = plot;
  }

  options(width) {
    const band = "rgba(31, 111, 235, 0.14)";
    const edge = "rgba(31, 111, 235, 0.35)";
    return {
      width,
      height: CHART_HEIGHT,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true, auto: false, range: () => [this.window.start, this.window.end] } },
      series: [
        {},
        { label: "min", stroke: edge, width: 1, points: { show: false } },
        { label: this.metric, stroke: "#1f6feb", width: 2, points: { show: false } },
        { label: "max", stroke: edge, width: 1, points: { show: false } },
      ],
      bands: [{ series: [3, 1], fill: band }],
      axes: [{ stroke: "#5f6b7a" }, { stroke: "#5f6b7a", size: 60 }],
    };
  }

  setHistory(series, asOf) {
    this.series = series;
    this.asOf = asOf;
    this.loading = false;
    for (const point of this.waiting) this.append(point);
    this.waiting = [];
    this.dirty = true;
  }

  startLoading() {
    this.loading = true;
    this.waiting = [];
  }

  append(point) {
    if (this.loading) {
      this.waiting.push(point);
      return;
    }
    if (point.id <= this.asOf) return; // already in the history
    this.series.insert(point.t, point.value);
    this.dirty = true;
  }

  /** Redraw if the data changed; move the time axis to the window either way (it slides in live ranges). */
  flush(slide) {
    if (this.dirty) {
      this.series.trim(slide ? this.window.start : -Infinity);
      this.plot.setData(this.series.data(), false);
      this.figure.dataset.points = String(this.series.length);
      const last = this.series.lastValue();
      this.figure.dataset.last = last === null ? "" : String(last);
      this.dirty = false;
    }
    this.plot.setScale("x", { min: this.window.start, max: this.window.end });
  }

  describe(rangeText) {
    this.plotHolder.setAttribute("aria-label", `Chart of ${this.metric} over ${rangeText}`);
  }

  resize(width) {
    this.plot.setSize({ width, height: CHART_HEIGHT });
  }

  destroy() {
    this.plot.destroy();
    this.figure.remove();
  }
}

/**
 * The range buttons, the custom range form, the progress of history loads, and the charts. `device` is the page's
 * DeviceModel (which metrics are numeric); `requestRender` asks the page for a coalesced render.
 */
export class ChartPanel {
  constructor({ root, api, device, requestRender }) {
    this.root = root;
    this.api = api;
    this.device = device;
    this.requestRender = requestRender;
    this.uPlot = null;
    this.charts = new Map(); // metric -> MetricChart
    this.range = "1h";
    this.custom = null; // {start, end} in unix seconds; end null = now
    this.window = { start: 0, end: 0 };
    this.loads = 0; // generation: a range change makes answers to older loads irrelevant
    this.abort = null;
    this.grid = root.querySelector(".chart-grid");
    this.note = root.querySelector(".chart-note");
    this.progress = new LoadProgress(root.querySelector(".chart-progress"));
    this.customForm = root.querySelector(".chart-custom");
    this.rangeButtons = [...root.querySelectorAll("button[data-range]")];
  }

  async start({ moduleUrl, cssUrl }) {
    this.uPlot = await loadUplot(moduleUrl, cssUrl);
    if (!this.uPlot) {
      this.showNote("Charts are unavailable: the chart library is not installed on this gateway.");
      for (const button of this.rangeButtons) button.disabled = true;
      return;
    }
    this.root.dataset.ready = "true";
    for (const button of this.rangeButtons) {
      button.addEventListener("click", () => this.choose(button.dataset.range));
    }
    this.customForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.applyCustom();
    });
    new ResizeObserver(() => this.resize()).observe(this.grid);
    setInterval(() => this.slide(), SLIDE_INTERVAL_MS);
    this.choose(this.range);
  }

  /** Whether the window ends now (and slides, taking live points). */
  get sliding() {
    return this.custom === null || this.custom.end === null;
  }

  /** A range button: a preset loads at once; "custom" opens the form (the charts keep their range until Show). */
  choose(range) {
    for (const button of this.rangeButtons) button.setAttribute("aria-pressed", String(button.dataset.range === range));
    this.customForm.hidden = range !== "custom";
    if (range === "custom") {
      this.openCustomForm();
      return;
    }
    this.range = range;
    this.custom = null;
    this.load();
  }

  openCustomForm() {
    const from = this.customForm.elements.namedItem("from");
    if (!from.value) from.value = localInputValue(this.window.start || Date.now() / 1000 - 3600);
    from.focus();
  }

  applyCustom() {
    const from = this.customForm.elements.namedItem("from");
    const to = this.customForm.elements.namedItem("to");
    const start = parseLocalInput(from.value);
    const end = to.value ? parseLocalInput(to.value) : null;
    if (start === null) return this.invalid(from, "Choose when the range starts.");
    if (end !== null && end <= start) return this.invalid(to, "The end of the range must be after its start.");
    from.removeAttribute("aria-invalid");
    to.removeAttribute("aria-invalid");
    this.range = "custom";
    this.custom = { start, end };
    this.load();
  }

  invalid(input, message) {
    input.setAttribute("aria-invalid", "true");
    this.showNote(message);
    input.focus();
  }

  updateWindow() {
    const now = Date.now() / 1000;
    if (this.range === "custom") {
      this.window.start = this.custom.start;
      this.window.end = this.custom.end ?? now;
    } else {
      this.window.start = now - RANGES[this.range];
      this.window.end = now;
    }
  }

  rangeText() {
    if (this.range !== "custom") return RANGE_LABELS[this.range];
    const format = (ts) => new Date(ts * 1000).toLocaleString();
    return `${format(this.window.start)} to ${this.custom.end === null ? "now" : format(this.window.end)}`;
  }

  /** The numeric metrics, in name order (charted: the first CHARTS_MAX). */
  numericMetrics() {
    return this.device.sortedMetrics().filter((metric) => typeof this.device.values.get(metric).value === "number");
  }

  async load() {
    if (!this.uPlot) return;
    this.loads += 1;
    const generation = this.loads;
    this.abort?.abort();
    this.abort = new AbortController();
    this.updateWindow();
    this.syncCharts();
    this.showNote("");
    const metrics = [...this.charts.keys()];
    this.root.dataset.loading = "true";
    this.root.dataset.range = this.range;
    const total = metrics.length;
    let done = 0;
    this.progress.start(`Loading history: 0 of ${plural(total, "metric")}…`);
    const buckets = Math.max(50, Math.min(BUCKETS_MAX, Math.round(this.grid.clientWidth || 600)));
    const failures = [];
    await Promise.all(
      metrics.map(async (metric) => {
        const chart = this.charts.get(metric);
        chart.startLoading();
        chart.describe(this.rangeText());
        try {
          const answer = await this.api.telemetry(
            this.device.id,
            { metrics: metric, start: this.window.start.toFixed(3), end: this.window.end.toFixed(3), buckets },
            { signal: this.abort.signal },
          );
          if (generation !== this.loads) return;
          chart.setHistory(Series.fromApi(answer.series?.[metric], answer.bucket), answer.last_id ?? 0);
        } catch (error) {
          if (generation !== this.loads || error.name === "AbortError") return;
          chart.setHistory(new Series(), 0);
          failures.push(`${metric}: ${error.message}`);
        }
        done += 1;
        this.progress.update(`Loading history: ${done} of ${plural(total, "metric")}…`, done, total);
      }),
    );
    if (generation !== this.loads) return;
    this.progress.stop();
    delete this.root.dataset.loading;
    this.showNote(this.loadNote(failures, total));
    this.requestRender();
  }

  /** One chart per numeric metric (new metrics get one, up to the cap). */
  syncCharts() {
    for (const metric of this.numericMetrics().slice(0, CHARTS_MAX)) {
      if (this.charts.has(metric)) continue;
      this.charts.set(metric, new MetricChart(this.uPlot, metric, this.grid, this.window));
    }
  }

  loadNote(failures, total) {
    if (failures.length) return `Some history could not be loaded (${failures.join("; ")}).`;
    if (!total) return "No numeric telemetry to chart yet.";
    const left = this.numericMetrics().length - total;
    return left > 0 ? `${plural(left, "more numeric metric")} not charted (at most ${CHARTS_MAX} charts).` : "";
  }

  /** A telemetry frame for this device, live: its numbers go on the charts (a new numeric metric gets one). */
  onTelemetry(frame) {
    if (!this.uPlot || !this.sliding) return;
    const values = frame.values && typeof frame.values === "object" ? frame.values : {};
    let added = false;
    for (const [metric, value] of Object.entries(values)) {
      if (typeof value !== "number") continue;
      let chart = this.charts.get(metric);
      if (!chart && this.charts.size < CHARTS_MAX) {
        chart = new MetricChart(this.uPlot, metric, this.grid, this.window);
        chart.setHistory(new Series(), frame.id - 1); // a metric new to the page has no history before this frame
        chart.describe(this.rangeText());
        this.charts.set(metric, chart);
        added = true;
      }
      chart?.append({ id: frame.id, t: frame.ts, value });
    }
    if (added && this.note.dataset.kind === "empty") this.showNote("");
  }

  /** Draw what changed (called by the page's coalesced render). */
  render() {
    if (!this.uPlot) return;
    if (this.sliding) this.updateWindow();
    for (const chart of this.charts.values()) chart.flush(this.sliding);
  }

  slide() {
    if (this.sliding && !document.hidden && this.charts.size) this.requestRender();
  }

  resize() {
    const width = this.grid.firstElementChild?.clientWidth;
    if (!width) return;
    for (const chart of this.charts.values()) chart.resize(width);
  }

  /** After a gap: the history may have holes that live points cannot fill, so load the range again. */
  reload() {
    if (this.uPlot) this.load();
  }

  showNote(text) {
    this.note.textContent = text;
    this.note.hidden = !text;
    this.note.dataset.kind = text.startsWith("No numeric") ? "empty" : "";
  }
}

/** A datetime-local input's value (local time, minutes) for a unix time. */
function localInputValue(ts) {
  const date = new Date(ts * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
    `T${pad(date.getHours())}:${pad(date.getMinutes())}`
  );
}

function parseLocalInput(value) {
  if (!value) return null;
  const ms = new Date(value).getTime(); // a datetime-local value without a zone is local time
  return Number.isFinite(ms) ? ms / 1000 : null;
}
