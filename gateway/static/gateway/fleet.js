// The fleet page: one page of devices at a time from GET /api/devices (search, filters, sorting and paging are
// the server's), kept live by the socket's "*" subscription, with fleet-wide counts (online, offline, alerting)
// that move with status and alert events and are re-read every REFRESH_INTERVAL_MS.
//
// Built for thousands of devices: only the shown page is in the DOM; events update models, and the DOM follows in
// coalesced renders (a few per second), touching only the rows that changed.

import { ApiError } from "./api.js";
import { DeviceModel, isAlert } from "./model.js";
import {
  LoadProgress,
  RenderScheduler,
  el,
  formatCount,
  formatValue,
  plural,
  setBadge,
  setText,
  setTime,
} from "./dom.js";

const PAGE_SIZE = 100;
const VALUES_SHOWN = 6;
const REFRESH_INTERVAL_MS = 15_000;
const NEWCOMER_REFRESH_MS = 1_500; // a device not on the page spoke while the page has room: look again, this late
const SEARCH_DELAY_MS = 250;
const FIRST_LOAD_RETRY_MS = 5_000;
const CLOCK_INTERVAL_MS = 5_000;
const FILTERS = ["q", "online", "kind", "fleet", "alerting", "sort", "offset"];
const SORTS = ["id", "-id", "name", "-name", "last_seen", "-last_seen"];
const DEFAULT_SORT = "id";

export class FleetPage {
  constructor({ config, api }) {
    this.config = config;
    this.api = api;
    this.form = document.getElementById("fleet-filters");
    this.body = document.getElementById("fleet-rows");
    this.table = document.getElementById("fleet");
    this.empty = document.getElementById("fleet-empty");
    this.summary = document.getElementById("fleet-summary");
    this.pageInfo = document.getElementById("page-info");
    this.prev = document.getElementById("page-prev");
    this.next = document.getElementById("page-next");
    this.status = document.getElementById("fleet-status");
    this.countButtons = [...document.querySelectorAll("[data-count]")];
    this.sortButtons = [...document.querySelectorAll("button[data-sort]")];
    this.progress = new LoadProgress(document.getElementById("fleet-loading"));
    this.scheduler = new RenderScheduler(() => this.flush());
    this.filters = readFilters(new URLSearchParams(window.location.search));
    this.models = new Map(); // id -> DeviceModel, for the shown page
    this.rows = new Map(); // id -> row parts, for the shown page
    this.dirty = new Set();
    this.total = 0;
    this.counts = { online: 0, offline: 0, alerting: 0 };
    this.countsAsOf = 0; // counts reflect every event up to this id
    this.presence = new Map(); // id -> {online, id}: the newest presence known per device, for count deltas
    this.alertingIds = new Set(); // devices known to be alerting, so one device's second alert counts once
    this.passed = new Set(); // devices seen live that the current page does not show (and should not)
    this.loads = 0;
    this.abort = null;
    this.rendered = false;
    this.shownOrder = null; // the ids of the rows in the table, in order
    this.newcomerTimer = null;
    this.searchTimer = null;
    this.bindControls();
  }

  get subscription() {
    return "*";
  }

  /** Load the first page (retrying until it comes); resolves with its last_id (the socket subscribes after it). */
  async start() {
    let lastId = await this.load({ quiet: false });
    while (lastId === null) {
      await new Promise((resolve) => setTimeout(resolve, FIRST_LOAD_RETRY_MS));
      lastId = await this.load({ quiet: false });
    }
    setInterval(() => this.refresh(), REFRESH_INTERVAL_MS);
    setInterval(() => this.tickClock(), CLOCK_INTERVAL_MS);
    return lastId;
  }

  // --- controls ---

  bindControls() {
    this.writeControls();
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.filtersChanged();
    });
    this.form.addEventListener("change", (event) => {
      if (event.target.name !== "q") this.filtersChanged();
    });
    this.form.elements.namedItem("q").addEventListener("input", () => {
      clearTimeout(this.searchTimer);
      this.searchTimer = setTimeout(() => this.filtersChanged(), SEARCH_DELAY_MS);
    });
    for (const button of this.sortButtons) {
      button.addEventListener("click", () => {
        const key = button.dataset.sort;
        this.filters.sort = this.filters.sort === key ? `-${key}` : key;
        this.filters.offset = 0;
        this.writeControls();
        this.load({ quiet: false });
      });
    }
    for (const button of this.countButtons) {
      button.addEventListener("click", () => this.toggleCount(button.dataset.count));
    }
    this.prev.addEventListener("click", () => this.turn(-1));
    this.next.addEventListener("click", () => this.turn(1));
    this.body.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-ack]");
      if (button) this.acknowledge(button.dataset.ack, button);
    });
  }

  filtersChanged() {
    clearTimeout(this.searchTimer);
    const form = this.form.elements;
    this.filters.q = form.namedItem("q").value.trim();
    this.filters.online = form.namedItem("online").value;
    this.filters.kind = form.namedItem("kind").value;
    this.filters.fleet = form.namedItem("fleet").value;
    this.filters.alerting = form.namedItem("alerting").checked ? "true" : "";
    this.filters.offset = 0;
    this.writeControls();
    this.load({ quiet: false });
  }

  /** The count buttons double as filters: online, offline, or alerting devices only (again: all). */
  toggleCount(which) {
    if (which === "alerting") {
      this.filters.alerting = this.filters.alerting ? "" : "true";
    } else {
      const wanted = which === "online" ? "true" : "false";
      this.filters.online = this.filters.online === wanted ? "" : wanted;
    }
    this.filters.offset = 0;
    this.writeControls();
    this.load({ quiet: false });
  }

  turn(direction) {
    const offset = this.filters.offset + direction * PAGE_SIZE;
    if (offset < 0 || offset >= this.total) return;
    this.filters.offset = offset;
    this.load({ quiet: false });
  }

  /** Put the filters into the form, the sort headers and the count buttons. */
  writeControls() {
    const form = this.form.elements;
    form.namedItem("q").value = this.filters.q;
    setSelect(form.namedItem("online"), this.filters.online);
    setSelect(form.namedItem("kind"), this.filters.kind);
    setSelect(form.namedItem("fleet"), this.filters.fleet);
    form.namedItem("alerting").checked = this.filters.alerting === "true";
    for (const button of this.sortButtons) {
      const key = button.dataset.sort;
      const order = this.filters.sort === key ? "ascending" : this.filters.sort === `-${key}` ? "descending" : "none";
      button.closest("th").setAttribute("aria-sort", order);
      button.dataset.order = order;
    }
    for (const button of this.countButtons) {
      const which = button.dataset.count;
      const pressed =
        which === "alerting" ? this.filters.alerting === "true" : this.filters.online === String(which === "online");
      button.setAttribute("aria-pressed", String(pressed));
    }
  }

  // --- loading ---

  query() {
    const { q, online, kind, fleet, alerting, sort, offset } = this.filters;
    return { q, online, kind, fleet, alerting, sort, offset, limit: PAGE_SIZE };
  }

  /**
   * Load the page the filters describe. `quiet` (the periodic refresh) shows no progress and keeps a failure to
   * the status line. Resolves with the answer's last_id, or null when it failed or a newer load replaced it.
   */
  async load({ quiet }) {
    const generation = (this.loads += 1);
    this.abort?.abort();
    this.abort = new AbortController();
    if (!quiet) {
      this.progress.start("Loading devices…");
      this.table.setAttribute("aria-busy", "true");
      this.passed.clear();
      window.history.replaceState(null, "", urlFor(this.filters));
    }
    try {
      const answer = await this.api.devices(this.query(), { signal: this.abort.signal });
      if (generation !== this.loads) return null;
      this.show(answer);
      this.setStatus("");
      if (answer.counts?.alerting > 0) this.loadAlerting(generation);
      else this.alertingIds.clear();
      return Number.isInteger(answer.last_id) ? answer.last_id : 0;
    } catch (error) {
      if (generation === this.loads && error.name !== "AbortError") this.failed(error);
      return null;
    } finally {
      if (generation === this.loads) {
        this.progress.stop();
        this.table.removeAttribute("aria-busy");
      }
    }
  }

  /** The periodic re-read: acknowledgements by other operators, alerts that aged out, new devices, drift. */
  refresh() {
    if (document.hidden) return;
    this.passed.clear();
    this.load({ quiet: true });
  }

  /** Which devices alert, fleet-wide (usually few), so that live alerts count each device once. */
  async loadAlerting(generation) {
    try {
      const answer = await this.api.devices({ alerting: "true", limit: 1000, sort: "id" }, { retries: 0 });
      if (generation !== this.loads) return;
      this.alertingIds = new Set((answer.devices || []).map((device) => device.id));
    } catch (error) {
      console.warn("gateway: could not read which devices alert", error);
    }
  }

  failed(error) {
    if (error.name === "SignedOut") return;
    const detail = error instanceof ApiError ? error.message : "the gateway did not answer";
    this.setStatus(`Could not load devices: ${detail}. Retrying in a moment.`);
    if (!this.rendered) this.empty.hidden = true;
  }

  setStatus(text) {
    setText(this.status, text);
    this.status.hidden = !text;
  }

  /** Show an answer of /api/devices: its page of devices, the totals, and the fleet-wide counts. */
  show(answer) {
    const snapshotId = Number.isInteger(answer.last_id) ? answer.last_id : 0;
    const devices = Array.isArray(answer.devices) ? answer.devices : [];
    const models = new Map();
    for (const entry of devices) {
      if (!entry || typeof entry.id !== "string") continue;
      const model = this.models.get(entry.id) || new DeviceModel(entry.id);
      model.applySnapshot(entry, snapshotId);
      models.set(entry.id, model);
      this.know(entry.id, model.online, snapshotId);
      if (model.alerting) this.alertingIds.add(entry.id);
    }
    this.models = models;
    for (const id of this.rows.keys()) if (!models.has(id)) this.rows.delete(id);
    this.total = Number.isInteger(answer.total) ? answer.total : models.size;
    if (answer.counts && snapshotId >= this.countsAsOf) {
      this.counts = { online: 0, offline: 0, alerting: 0, ...answer.counts };
      this.countsAsOf = snapshotId;
    }
    // Rows are kept per device: a refresh that brings the same page touches no row (focus stays where it is).
    const order = [...models.keys()].join("\u0000");
    if (order !== this.shownOrder) {
      this.body.replaceChildren(...[...models.values()].map((model) => this.row(model).tr));
      this.shownOrder = order;
    }
    this.dirty = new Set(models.keys());
    const first = !this.rendered;
    this.rendered = true;
    this.flush();
    if (first) performance.mark("fleet-first-render");
  }

  // --- live events ---

  onEvent(frame) {
    if (frame.type === "command") return;
    if (frame.type === "status") this.countPresence(frame);
    else if (isAlert(frame)) this.countAlert(frame);
    const model = this.models.get(frame.device);
    if (model) {
      if (model.apply(frame)) this.dirty.add(frame.device);
    } else {
      this.newcomer(frame.device);
    }
    this.scheduler.request();
  }

  onError() {}

  know(id, online, eventId) {
    const known = this.presence.get(id);
    if (!known || known.id <= eventId) this.presence.set(id, { online, id: eventId });
  }

  /** A stored status is a change of presence (the bridge drops repeats), so it moves one device between counts. */
  countPresence(frame) {
    const known = this.presence.get(frame.device);
    const online = Boolean(frame.online);
    this.know(frame.device, online, frame.id);
    if (frame.id <= this.countsAsOf || (known && (known.id >= frame.id || known.online === online))) return;
    const delta = online ? 1 : -1;
    this.counts.online = Math.max(0, this.counts.online + delta);
    this.counts.offline = Math.max(0, this.counts.offline - delta);
  }

  countAlert(frame) {
    if (frame.id <= this.countsAsOf || this.alertingIds.has(frame.device)) return;
    this.alertingIds.add(frame.device);
    this.counts.alerting += 1;
  }

  /**
   * A device that is not on the page spoke. If the page has room it may belong there (a new device, say): look
   * again soon, once per device until the filters or the page change.
   */
  newcomer(id) {
    if (this.passed.has(id)) return;
    this.passed.add(id);
    const room = this.filters.offset + PAGE_SIZE > this.total;
    if (!room || this.newcomerTimer !== null) return;
    this.newcomerTimer = setTimeout(() => {
      this.newcomerTimer = null;
      this.load({ quiet: true });
    }, NEWCOMER_REFRESH_MS);
  }

  /** After a gap in the live stream: read the page and the counts again. */
  reload() {
    return this.load({ quiet: true });
  }

  // --- acknowledging alerts ---

  async acknowledge(id, button) {
    button.disabled = true;
    try {
      const answer = await this.api.acknowledge(id);
      const model = this.models.get(id);
      if (model) {
        model.acknowledged(answer.device);
        this.dirty.add(id);
      }
      if (this.alertingIds.delete(id) && !answer.device?.alerting) {
        this.counts.alerting = Math.max(0, this.counts.alerting - 1);
      }
      this.setStatus("");
      this.scheduler.request();
    } catch (error) {
      button.disabled = false;
      if (error.name !== "SignedOut") this.setStatus(`Could not acknowledge the alerts of ${id}: ${error.message}`);
    }
  }

  // --- rendering ---

  flush() {
    for (const id of this.dirty) {
      const model = this.models.get(id);
      if (model) this.renderRow(model);
    }
    this.dirty.clear();
    this.renderCounts();
  }

  renderCounts() {
    const { online, offline, alerting } = this.counts;
    for (const button of this.countButtons) {
      setText(button.querySelector(".count-value"), formatCount(this.counts[button.dataset.count] ?? 0));
    }
    setText(this.summary, `${plural(online + offline, "device")} · ${formatCount(online)} online`);
    this.table.dataset.alerting = String(alerting);
    const shown = this.models.size;
    const first = shown ? this.filters.offset + 1 : 0;
    setText(
      this.pageInfo,
      shown ? `${formatCount(first)}–${formatCount(first + shown - 1)} of ${formatCount(this.total)}` : "",
    );
    this.prev.disabled = this.filters.offset <= 0;
    this.next.disabled = this.filters.offset + PAGE_SIZE >= this.total;
    this.empty.hidden = shown > 0 || !this.rendered;
    setText(this.empty, this.filtered() ? "No device matches these filters." : "No devices yet.");
  }

  filtered() {
    const { q, online, kind, fleet, alerting } = this.filters;
    return Boolean(q || online || kind || fleet || alerting);
  }

  tickClock() {
    for (const [id, row] of this.rows) setTime(row.seen, this.models.get(id).lastSeen);
  }

  row(model) {
    let row = this.rows.get(model.id);
    if (row) return row;
    const tr = el("tr");
    tr.setAttribute("data-device", model.id);
    const idCell = el("td", "col-id");
    const link = el("a", "mono", model.id);
    link.href = this.config.deviceUrl(model.id);
    idCell.append(link);
    const name = el("td", "col-name");
    const kind = el("td", "col-kind");
    const statusCell = el("td", "col-status");
    const badge = el("span", "badge");
    statusCell.append(badge);
    const alertCell = el("td", "col-alerts");
    const alerts = el("span", "tag tag-warning alert-count");
    const ack = el("button", "button button-small", "Acknowledge");
    ack.type = "button";
    ack.dataset.ack = model.id;
    ack.setAttribute("aria-label", `Acknowledge the alerts of ${model.id}`);
    alertCell.append(alerts, ack);
    const seen = el("td", "col-seen");
    const valuesCell = el("td", "col-values");
    const list = el("ul", "values");
    const more = el("a", "more");
    more.href = link.href;
    more.hidden = true;
    valuesCell.append(list, more);
    tr.append(idCell, name, kind, statusCell, alertCell, seen, valuesCell);
    row = { tr, name, kind, badge, alerts, ack, seen, list, more, metrics: new Map(), shown: "" };
    this.rows.set(model.id, row);
    return row;
  }

  renderRow(model) {
    const row = this.row(model);
    setText(row.name, model.name);
    setText(row.kind, model.kind);
    row.kind.title = model.fleets.length ? `Fleets: ${model.fleets.join(", ")}` : "";
    setBadge(row.badge, model.online);
    row.tr.dataset.alerting = String(model.alerting);
    row.alerts.hidden = !model.alerting;
    row.ack.hidden = !model.alerting;
    row.ack.disabled = false;
    setText(row.alerts, model.alerting ? plural(model.alerts, "alert") : "");
    setTime(row.seen, model.lastSeen);
    this.renderValues(model, row);
  }

  renderValues(model, row) {
    const metrics = model.sortedMetrics();
    const shown = metrics.slice(0, VALUES_SHOWN);
    const key = shown.join("\u0000");
    if (key !== row.shown) {
      // The set of metrics changed: rebuild the list (rare); otherwise only texts change below.
      row.metrics.clear();
      const items = shown.map((metric) => {
        const item = el("li");
        item.setAttribute("data-metric", metric);
        const valueNode = el("span", "value");
        item.append(el("span", "metric", metric), valueNode);
        row.metrics.set(metric, valueNode);
        return item;
      });
      row.list.replaceChildren(...items);
      row.shown = key;
      const hidden = metrics.length - shown.length;
      row.more.hidden = hidden <= 0;
      row.more.textContent = hidden > 0 ? `+${hidden} more` : "";
    }
    for (const [metric, valueNode] of row.metrics) {
      const text = formatValue(model.values.get(metric).value);
      if (valueNode.textContent !== text) {
        valueNode.textContent = text;
        valueNode.title = text;
      }
    }
  }
}

/** The filters from a query string, each checked against what the API accepts. */
function readFilters(params) {
  const filters = { q: "", online: "", kind: "", fleet: "", alerting: "", sort: DEFAULT_SORT, offset: 0 };
  for (const key of FILTERS) {
    const value = params.get(key);
    if (value === null) continue;
    if (key === "offset") filters.offset = Math.max(0, Math.floor(Number(value) / PAGE_SIZE) * PAGE_SIZE) || 0;
    else if (key === "online" || key === "alerting") filters[key] = ["true", "false"].includes(value) ? value : "";
    else if (key === "sort") filters.sort = SORTS.includes(value) ? value : DEFAULT_SORT;
    else filters[key] = value.slice(0, 200);
  }
  if (filters.alerting === "false") filters.alerting = "";
  return filters;
}

function urlFor(filters) {
  const params = new URLSearchParams();
  for (const key of FILTERS) {
    const value = filters[key];
    if (value && !(key === "sort" && value === DEFAULT_SORT)) params.set(key, String(value));
  }
  const query = params.toString();
  return query ? `?${query}` : window.location.pathname;
}

/** Select `value` in a <select>, adding it as an option first when the page did not list it. */
function setSelect(select, value) {
  if (value && ![...select.options].some((option) => option.value === value)) {
    select.append(new Option(value, value));
  }
  select.value = value;
}
