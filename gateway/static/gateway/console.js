// The operator console: one WebSocket (GatewaySocket) feeding a small in-memory model, rendered in
// coalesced batches. No build step: this file is served as is, as an ES module.
//
// Safety rule for this file: every device-provided string (ids, names, metric names, values, event names
// and messages) reaches the page through textContent or an attribute set with setAttribute, never through
// innerHTML or an HTML string.

const PING_INTERVAL_MS = 25_000;
const SILENCE_LIMIT_MS = 65_000; // no frame at all for this long (pings included): the socket is dead
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 30_000;
const CATCH_UP_QUIET_MS = 400; // after subscribing, this long without a frame means the replay is over
const RECENT_IDS_MAX = 10_000;
const FLUSH_INTERVAL_MS = 200;
const CLOCK_INTERVAL_MS = 5_000;
const EVENTS_MAX = 100;
const FLEET_VALUES_SHOWN = 12;
const CLOSE_UNAUTHENTICATED = 4401;
const CLOSE_FORBIDDEN = 4403;

// --- the socket -----------------------------------------------------------------------------------------

/**
 * One WebSocket to the gateway (contract section 3) that survives reconnects without losing or repeating
 * events (section 4): it resubscribes with `after` = the highest event id received, and drops ids it has
 * already delivered (a bounded set of recent ids, since ids of different devices may arrive out of order).
 *
 * Callbacks: onEvent(frame) for each new device event; onGap(from, to) -> Promise when events could not be
 * replayed (reload state over HTTP); onState(state, detail) with state one of connecting, live, catching-up,
 * reconnecting, disconnected; onError(frame) for error frames.
 */
export class GatewaySocket {
  constructor({ url, devices = "*", after = 0, onEvent, onGap, onState, onError }) {
    this.url = url;
    this.devices = devices;
    this.lastId = Number.isInteger(after) && after > 0 ? after : 0;
    this.floor = this.lastId; // ids at or below it are already in the state the page started from
    this.onEvent = onEvent || (() => {});
    this.onGap = onGap || (() => Promise.resolve());
    this.onState = onState || (() => {});
    this.onError = onError || (() => {});
    this.recent = new Set();
    this.recentOrder = [];
    this.recentHead = 0;
    this.ws = null;
    this.state = null;
    this.attempt = 0;
    this.stopped = false;
    this.reconnectTimer = null;
    this.pingTimer = null;
    this.quietTimer = null;
    this.catchUpTo = 0;
    this.gaps = 0;
    this.lastFrameAt = 0;
    this.setState("connecting");
  }

  start() {
    this.stopped = false;
    this.connect();
    return this;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    this.clearSocketTimers();
    if (this.ws) this.ws.close(1000, "page closed");
  }

  setState(state, detail = "") {
    if (state === this.state && detail === this.stateDetail) return;
    this.state = state;
    this.stateDetail = detail;
    this.onState(state, detail);
  }

  connect() {
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    if (this.stopped) return;
    if (this.attempt > 0) this.setState("reconnecting", "Reconnecting…");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      console.error("gateway: cannot open the WebSocket", error);
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.lastFrameAt = Date.now();
      this.pingTimer = setInterval(() => this.ping(), PING_INTERVAL_MS);
    };
    ws.onmessage = (message) => {
      if (ws !== this.ws) return;
      this.lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (error) {
        console.warn("gateway: ignoring a frame that is not JSON", error);
        return;
      }
      this.handleFrame(frame);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.clearSocketTimers();
      if (this.stopped) return;
      if (event.code === CLOSE_UNAUTHENTICATED) {
        this.setState("disconnected", "Signed out: log in again");
        return;
      }
      if (event.code === CLOSE_FORBIDDEN) {
        this.setState("disconnected", "Refused by the gateway");
        return;
      }
      this.scheduleReconnect();
    };
    // onerror is always followed by onclose, which does the work.
    ws.onerror = () => {};
  }

  clearSocketTimers() {
    clearInterval(this.pingTimer);
    clearTimeout(this.quietTimer);
    this.pingTimer = null;
    this.quietTimer = null;
  }

  scheduleReconnect() {
    if (this.stopped || this.reconnectTimer !== null) return;
    // Capped exponential backoff with jitter, so that a restarted gateway is not hit by every browser at once.
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.min(this.attempt, 16));
    const delay = cap / 2 + Math.random() * (cap / 2);
    this.attempt += 1;
    this.setState("reconnecting", `Reconnecting in ${Math.max(1, Math.round(delay / 1000))} s`);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  reconnectNow() {
    if (this.stopped || this.ws || this.state === "disconnected") return;
    this.connect();
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  ping() {
    if (Date.now() - this.lastFrameAt > SILENCE_LIMIT_MS && this.ws) {
      // Half-open connection (laptop lid, NAT timeout): give up on it and reconnect.
      console.warn("gateway: no frame for a while, reconnecting");
      const ws = this.ws;
      this.ws = null;
      this.clearSocketTimers();
      ws.close(4000, "silent");
      this.scheduleReconnect();
      return;
    }
    this.send({ op: "ping" });
  }

  handleFrame(frame) {
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case "hello":
        this.onHello(frame);
        break;
      case "subscribed":
        this.attempt = 0;
        if (this.catchUpTo) this.armQuietTimer(CATCH_UP_QUIET_MS);
        else this.maybeLive();
        break;
      case "pong":
        break;
      case "error":
        console.warn("gateway error frame:", frame.code, frame.message);
        this.onError(frame);
        break;
      case "gap":
        this.handleGap(frame);
        break;
      case "batch":
        if (Array.isArray(frame.events)) {
          for (const event of frame.events) this.handleEvent(event);
        }
        break;
      default:
        this.handleEvent(frame);
    }
  }

  onHello(frame) {
    const serverLast = Number.isInteger(frame.last_id) ? frame.last_id : 0;
    const subscribe = { op: "subscribe", devices: this.devices, after: this.lastId };
    this.catchUpTo = serverLast > this.lastId ? serverLast : 0;
    this.setState(this.catchUpTo ? "catching-up" : "connecting", this.catchUpTo ? "Catching up…" : "Subscribing…");
    this.send(subscribe);
  }

  /** Go live once no frame has arrived for CATCH_UP_QUIET_MS (the replay, if any, is then over). */
  armQuietTimer(delay) {
    clearTimeout(this.quietTimer);
    this.quietTimer = setTimeout(() => {
      const quietFor = Date.now() - this.lastFrameAt;
      if (quietFor >= CATCH_UP_QUIET_MS) this.maybeLive(true);
      else this.armQuietTimer(CATCH_UP_QUIET_MS - quietFor);
    }, delay);
  }

  maybeLive(quiet = false) {
    if (!this.ws || this.gaps > 0) return;
    if (this.catchUpTo && this.lastId < this.catchUpTo && !quiet) return;
    this.catchUpTo = 0;
    this.setState("live", "Live");
  }

  handleEvent(frame) {
    const id = frame && frame.id;
    if (!Number.isInteger(id) || typeof frame.device !== "string") return;
    if (id > this.lastId) this.lastId = id;
    if (id <= this.floor || this.recent.has(id)) return;
    this.remember(id);
    try {
      this.onEvent(frame);
    } catch (error) {
      console.error("gateway: failed to apply an event", frame, error);
    }
    if (this.catchUpTo && id >= this.catchUpTo) this.maybeLive();
  }

  remember(id) {
    // A ring buffer of the ids delivered most recently, mirrored in a Set for O(1) lookups.
    if (this.recentOrder.length < RECENT_IDS_MAX) {
      this.recentOrder.push(id);
    } else {
      this.recent.delete(this.recentOrder[this.recentHead]);
      this.recentOrder[this.recentHead] = id;
      this.recentHead = (this.recentHead + 1) % RECENT_IDS_MAX;
    }
    this.recent.add(id);
  }

  handleGap(frame) {
    const from = Number(frame.from);
    const to = Number(frame.to);
    if (Number.isFinite(to) && to > this.lastId) this.lastId = to;
    this.gaps += 1;
    this.setState("catching-up", "Reloading state…");
    Promise.resolve()
      .then(() => this.onGap(from, to))
      .catch((error) => console.error("gateway: reloading state after a gap failed", error))
      .finally(() => {
        this.gaps -= 1;
        if (this.gaps > 0 || !this.ws) return;
        this.maybeLive();
        if (this.state !== "live") this.armQuietTimer(CATCH_UP_QUIET_MS);
      });
  }
}

// --- the model -------------------------------------------------------------------------------------------

/**
 * What the page knows about devices. Every field remembers the id of the event that set it, so that
 * applying a state snapshot (which reflects all events up to its last_id) and live events in any order
 * always keeps the newest value.
 */
class DeviceModel {
  constructor(id) {
    this.id = id;
    this.name = "";
    this.kind = "";
    this.online = false;
    this.onlineId = -1;
    this.lastSeen = null; // unix seconds
    this.values = new Map(); // metric -> {value, id, ts}
  }

  applySnapshot(entry, snapshotId) {
    if (typeof entry.name === "string") this.name = entry.name;
    if (typeof entry.kind === "string") this.kind = entry.kind;
    if (snapshotId >= this.onlineId) {
      this.online = Boolean(entry.online);
      this.onlineId = snapshotId;
    }
    this.seen(entry.last_seen);
    const latest = entry.latest && typeof entry.latest === "object" ? entry.latest : {};
    const ts = typeof entry.latest_ts === "number" ? entry.latest_ts : null;
    for (const [metric, value] of Object.entries(latest)) {
      const current = this.values.get(metric);
      if (!current || current.id <= snapshotId) this.values.set(metric, { value, id: snapshotId, ts });
    }
  }

  /** Fold one event frame in; returns what changed: "values", "status", "seen" or "" (nothing). */
  apply(frame) {
    switch (frame.type) {
      case "telemetry": {
        const values = frame.values && typeof frame.values === "object" ? frame.values : {};
        for (const [metric, value] of Object.entries(values)) {
          const current = this.values.get(metric);
          if (!current || current.id <= frame.id) this.values.set(metric, { value, id: frame.id, ts: frame.ts });
        }
        this.seen(frame.ts);
        return "values";
      }
      case "status":
        if (frame.id >= this.onlineId) {
          this.online = Boolean(frame.online);
          this.onlineId = frame.id;
        }
        if (frame.online) this.seen(frame.ts);
        return "status";
      case "event":
        this.seen(frame.ts);
        return "seen";
      default:
        return "";
    }
  }

  seen(ts) {
    if (typeof ts === "number" && (this.lastSeen === null || ts > this.lastSeen)) this.lastSeen = ts;
  }

  sortedMetrics() {
    return [...this.values.keys()].sort(compareText);
  }
}

// --- formatting and DOM helpers -----------------------------------------------------------------------------

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
const compareText = (a, b) => collator.compare(a, b) || (a < b ? -1 : a > b ? 1 : 0);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function formatValue(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "number") {
    return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(12)));
  }
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function relativeTime(ts, now = Date.now() / 1000) {
  if (typeof ts !== "number") return "never";
  const age = Math.max(0, now - ts);
  if (age < 5) return "just now";
  if (age < 60) return `${Math.floor(age)} s ago`;
  if (age < 3600) return `${Math.floor(age / 60)} min ago`;
  if (age < 86400) return `${Math.floor(age / 3600)} h ago`;
  return `${Math.floor(age / 86400)} d ago`;
}

// Formatters are built once: toLocaleString() builds one per call, which shows at thousands of events per second.
const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const clockFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

function absoluteTime(ts) {
  return typeof ts === "number" ? dateTimeFormat.format(new Date(ts * 1000)) : "";
}

function clockTime(ts) {
  return typeof ts === "number" ? clockFormat.format(new Date(ts * 1000)) : "";
}

/** Fill a <time>-holding cell with a relative time (absolute time on hover). */
function setTime(cell, ts) {
  let time = cell.firstElementChild;
  if (!time || time.tagName !== "TIME") {
    cell.replaceChildren();
    time = cell.appendChild(document.createElement("time"));
  }
  const text = relativeTime(ts);
  if (time.textContent !== text) time.textContent = text;
  if (typeof ts === "number") {
    const iso = new Date(ts * 1000).toISOString();
    if (time.getAttribute("datetime") !== iso) {
      time.setAttribute("datetime", iso);
      time.title = absoluteTime(ts);
    }
  } else {
    time.removeAttribute("datetime");
    time.removeAttribute("title");
  }
}

function setBadge(badge, online) {
  const value = online ? "true" : "false";
  if (badge.dataset.online !== value) {
    badge.dataset.online = value;
    badge.textContent = online ? "online" : "offline";
  }
}

/**
 * Runs `render` at most once per FLUSH_INTERVAL_MS, in an animation frame, however often it is asked:
 * thousands of events per second become a handful of DOM updates.
 */
class RenderScheduler {
  constructor(render) {
    this.render = render;
    this.pending = false;
    this.last = 0;
  }

  request() {
    if (this.pending) return;
    this.pending = true;
    const wait = Math.max(0, this.last + FLUSH_INTERVAL_MS - performance.now());
    setTimeout(() => {
      requestAnimationFrame(() => {
        this.pending = false;
        this.last = performance.now();
        this.render();
      });
    }, wait);
  }
}

// --- connection indicator -------------------------------------------------------------------------------

const STATE_LABELS = {
  connecting: "Connecting…",
  live: "Live",
  "catching-up": "Catching up…",
  reconnecting: "Reconnecting…",
  disconnected: "Disconnected",
};

function showConnection(state, detail) {
  const indicator = document.getElementById("connection");
  if (!indicator) return;
  indicator.dataset.state = state;
  const label = indicator.querySelector(".connection-label");
  const text = STATE_LABELS[state] || state;
  if (label) label.textContent = state === "disconnected" && detail ? detail : text;
  indicator.title = detail || text;
}

// --- the fleet page -----------------------------------------------------------------------------------------

class FleetPage {
  constructor(config, state) {
    this.config = config;
    this.devices = new Map(); // id -> DeviceModel
    this.rows = new Map(); // id -> row parts
    this.order = []; // device ids in table order
    this.dirty = new Set();
    this.body = document.getElementById("fleet-rows");
    this.empty = document.getElementById("fleet-empty");
    this.summary = document.getElementById("fleet-summary");
    this.scheduler = new RenderScheduler(() => this.flush());
    this.applyState(state);
    this.flush();
    setInterval(() => this.tickClock(), CLOCK_INTERVAL_MS);
  }

  get subscription() {
    return "*";
  }

  model(id) {
    let device = this.devices.get(id);
    if (!device) {
      device = new DeviceModel(id);
      this.devices.set(id, device);
    }
    return device;
  }

  applyState(state) {
    const snapshotId = Number.isInteger(state.last_id) ? state.last_id : 0;
    for (const entry of state.devices || []) {
      if (!entry || typeof entry.id !== "string") continue;
      this.model(entry.id).applySnapshot(entry, snapshotId);
      this.dirty.add(entry.id);
    }
    this.scheduler.request();
  }

  onEvent(frame) {
    if (frame.type === "command") return;
    this.model(frame.device).apply(frame);
    this.dirty.add(frame.device);
    this.scheduler.request();
  }

  onError() {}

  flush() {
    for (const id of this.dirty) {
      const device = this.devices.get(id);
      if (device) this.renderRow(device);
    }
    this.dirty.clear();
    let online = 0;
    for (const device of this.devices.values()) if (device.online) online += 1;
    const count = this.devices.size;
    this.summary.textContent = `${count} device${count === 1 ? "" : "s"} · ${online} online`;
    this.empty.hidden = count > 0;
  }

  tickClock() {
    for (const [id, row] of this.rows) setTime(row.seen, this.devices.get(id).lastSeen);
  }

  renderRow(device) {
    let row = this.rows.get(device.id);
    if (!row) row = this.createRow(device);
    if (row.name.textContent !== device.name) row.name.textContent = device.name;
    setBadge(row.badge, device.online);
    setTime(row.seen, device.lastSeen);
    this.renderValues(device, row);
  }

  createRow(device) {
    const tr = el("tr");
    tr.setAttribute("data-device", device.id);
    const idCell = el("td", "col-id");
    const link = el("a", "mono", device.id);
    link.href = this.config.deviceUrl(device.id);
    idCell.append(link);
    const name = el("td", "col-name");
    const statusCell = el("td", "col-status");
    const badge = el("span", "badge");
    statusCell.append(badge);
    const seen = el("td", "col-seen");
    const valuesCell = el("td", "col-values");
    const list = el("ul", "values");
    const more = el("a", "more");
    more.href = link.href;
    more.hidden = true;
    valuesCell.append(list, more);
    tr.append(idCell, name, statusCell, seen, valuesCell);
    const row = { tr, name, badge, seen, list, more, metrics: new Map(), shown: "" };
    // Keep the table sorted by id: binary search for the insertion point.
    let lo = 0;
    let hi = this.order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (compareText(this.order[mid], device.id) < 0) lo = mid + 1;
      else hi = mid;
    }
    const before = lo < this.order.length ? this.rows.get(this.order[lo]).tr : null;
    this.body.insertBefore(tr, before);
    this.order.splice(lo, 0, device.id);
    this.rows.set(device.id, row);
    return row;
  }

  renderValues(device, row) {
    const metrics = device.sortedMetrics();
    const shown = metrics.slice(0, FLEET_VALUES_SHOWN);
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
      const text = formatValue(device.values.get(metric).value);
      if (valueNode.textContent !== text) {
        valueNode.textContent = text;
        valueNode.title = text;
      }
    }
  }

  async reload() {
    const state = await fetchState(this.config);
    this.applyState(state);
  }
}

// --- the device page ------------------------------------------------------------------------------------------

class DevicePage {
  constructor(config, state) {
    this.config = config;
    const entry = state.device || {};
    this.device = new DeviceModel(String(entry.id));
    this.device.applySnapshot(entry, Number.isInteger(state.last_id) ? state.last_id : 0);
    this.presence = document.getElementById("presence");
    this.lastSeen = document.getElementById("last-seen");
    this.metricBody = document.getElementById("metric-rows");
    this.metricsEmpty = document.getElementById("metrics-empty");
    this.eventBody = document.getElementById("event-rows");
    this.eventsEmpty = document.getElementById("events-empty");
    this.notice = document.getElementById("device-notice");
    this.metricRows = new Map(); // metric -> {tr, value, when}
    this.metricsKey = "";
    this.eventIds = new Set();
    this.pendingEvents = [];
    this.pendingNotes = [];
    this.scheduler = new RenderScheduler(() => this.flush());
    for (const frame of Array.isArray(state.events) ? state.events : []) this.queueEvent(frame);
    this.flush();
    setInterval(() => this.tickClock(), CLOCK_INTERVAL_MS);
  }

  get subscription() {
    return [this.device.id];
  }

  onEvent(frame) {
    if (frame.device !== this.device.id) return;
    this.device.apply(frame);
    this.queueEvent(frame);
    this.scheduler.request();
  }

  onError(frame) {
    if (frame.code === "unknown_device") {
      this.showNotice("This device no longer exists or you may no longer see it: updates have stopped.");
    }
  }

  showNotice(text) {
    this.notice.textContent = text;
    this.notice.hidden = false;
  }

  queueEvent(frame) {
    if (!Number.isInteger(frame.id) || this.eventIds.has(frame.id)) return;
    this.pendingEvents.push(frame);
    if (this.pendingEvents.length > EVENTS_MAX * 2) {
      // A flood: only the newest EVENTS_MAX can ever be shown.
      this.pendingEvents.sort((a, b) => b.id - a.id);
      this.pendingEvents.length = EVENTS_MAX;
    }
  }

  flush() {
    setBadge(this.presence, this.device.online);
    setTime(this.lastSeen, this.device.lastSeen);
    this.renderMetrics();
    this.renderEvents();
  }

  tickClock() {
    setTime(this.lastSeen, this.device.lastSeen);
    for (const [metric, row] of this.metricRows) setTime(row.when, this.device.values.get(metric).ts);
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
          const value = el("td", "value");
          const when = el("td", "when");
          tr.append(el("th", "metric", metric), value, when);
          tr.firstChild.setAttribute("scope", "row");
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
      const text = formatValue(entry.value);
      if (row.value.textContent !== text) row.value.textContent = text;
      setTime(row.when, entry.ts);
    }
  }

  renderEvents() {
    const fresh = this.pendingEvents.sort((a, b) => b.id - a.id);
    this.pendingEvents = [];
    for (const frame of fresh) {
      if (this.eventIds.has(frame.id)) continue;
      this.insertRow(this.eventRow(frame), frame.id);
      this.eventIds.add(frame.id);
    }
    for (const note of this.pendingNotes) this.insertRow(note, Number(note.dataset.id));
    this.pendingNotes = [];
    while (this.eventBody.children.length > EVENTS_MAX) {
      const last = this.eventBody.lastElementChild;
      this.eventIds.delete(Number(last.dataset.id));
      last.remove();
    }
    this.eventsEmpty.hidden = this.eventBody.children.length > 0;
  }

  insertRow(tr, id) {
    // Newest first; events normally arrive in id order, so the right place is almost always the top.
    let before = this.eventBody.firstElementChild;
    while (before && Number(before.dataset.id) > id) before = before.nextElementSibling;
    this.eventBody.insertBefore(tr, before);
  }

  eventRow(frame) {
    const tr = el("tr");
    tr.dataset.id = String(frame.id);
    tr.dataset.type = String(frame.type);
    const time = el("td", "col-time", clockTime(frame.ts));
    time.title = absoluteTime(frame.ts);
    const typeCell = el("td", "col-type");
    const detail = el("td", "detail");
    switch (frame.type) {
      case "telemetry": {
        typeCell.append(el("span", "tag tag-telemetry", "telemetry"));
        const values = frame.values && typeof frame.values === "object" ? frame.values : {};
        const list = el("ul", "values");
        for (const metric of Object.keys(values).sort(compareText)) {
          const item = el("li");
          item.append(el("span", "metric", metric), el("span", "value", formatValue(values[metric])));
          list.append(item);
        }
        detail.append(list);
        break;
      }
      case "status": {
        typeCell.append(el("span", "tag tag-status", "status"));
        const badge = el("span", "badge");
        setBadge(badge, Boolean(frame.online));
        detail.append(badge);
        break;
      }
      case "event": {
        const severity = ["info", "warning", "critical"].includes(frame.severity) ? frame.severity : "info";
        const tag = el("span", `tag tag-${severity}`, String(frame.severity ?? "event"));
        typeCell.append(tag);
        detail.append(el("span", "event-name", frame.name));
        if (typeof frame.message === "string" && frame.message) {
          detail.append(el("span", "event-message", frame.message));
        }
        if (frame.data && typeof frame.data === "object" && Object.keys(frame.data).length) {
          detail.append(el("code", "event-data", JSON.stringify(frame.data)));
        }
        break;
      }
      case "command": {
        typeCell.append(el("span", "tag tag-command", "command"));
        detail.append(el("span", "event-name", frame.name), el("span", "event-message", frame.state));
        if (frame.error) detail.append(el("span", "event-message", frame.error));
        break;
      }
      default:
        typeCell.append(el("span", "tag", frame.type));
    }
    tr.append(time, typeCell, detail);
    return tr;
  }

  async reload(from, to) {
    const state = await fetchState(this.config);
    const entry = (state.devices || []).find((device) => device && device.id === this.device.id);
    if (!entry) {
      this.showNotice("This device no longer exists or you may no longer see it.");
      return;
    }
    this.device.applySnapshot(entry, Number.isInteger(state.last_id) ? state.last_id : 0);
    const note = el("tr", "gap-note");
    note.dataset.id = String(to + 0.5); // sorts just above the missing range
    note.dataset.type = "gap";
    const cell = el(
      "td",
      "",
      `Some events (ids ${from}–${to}) could not be replayed and are missing here; values above were reloaded.`,
    );
    cell.colSpan = 3;
    note.append(cell);
    this.pendingNotes.push(note);
    this.scheduler.request();
  }
}

// --- start-up -----------------------------------------------------------------------------------------------

async function fetchState(config) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      const response = await fetch(config.stateUrl, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      const type = response.headers.get("content-type") || "";
      if (response.ok && type.includes("application/json")) return await response.json();
      if (response.redirected || response.status === 401 || response.status === 403) {
        window.location.assign(config.loginUrl);
        throw new Error("signed out");
      }
      throw new Error(`state request failed: HTTP ${response.status}`);
    } catch (error) {
      if (attempt >= 4 || error.message === "signed out") throw error;
      await new Promise((resolve) => setTimeout(resolve, 1000 * 2 ** attempt));
    }
  }
}

function readConfig() {
  const data = document.body.dataset;
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return {
    page: data.page,
    wsUrl: `${scheme}//${window.location.host}${data.wsPath || "/ws/"}`,
    stateUrl: data.stateUrl,
    loginUrl: data.loginUrl || "/login/",
    deviceUrl: (id) => (data.deviceUrl || "/devices/__DEVICE__/").replace("__DEVICE__", encodeURIComponent(id)),
  };
}

function readState() {
  const script = document.getElementById("console-state");
  return script ? JSON.parse(script.textContent) : null;
}

function main() {
  const config = readConfig();
  const state = readState();
  if (!state) return;
  const Page = { fleet: FleetPage, device: DevicePage }[config.page];
  if (!Page) return;
  const page = new Page(config, state);
  const socket = new GatewaySocket({
    url: config.wsUrl,
    devices: page.subscription,
    after: state.last_id,
    onEvent: (frame) => page.onEvent(frame),
    onGap: (from, to) => page.reload(from, to),
    onState: showConnection,
    onError: (frame) => page.onError(frame),
  });
  socket.start();
  window.addEventListener("online", () => socket.reconnectNow());
  // Close the socket when the page goes away (keeps it eligible for the back/forward cache) and resume,
  // from the last id seen, if the browser brings the page back.
  window.addEventListener("pagehide", () => socket.stop());
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) socket.start();
  });
}

main();
