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
const COMMANDS_MAX = 50;
const COMMAND_IDS_MAX = 1_000;
const COMMAND_TEXT_MAX = 200;
const REQUEST_SENDS_MAX = 3; // a request sent this many times without an answer is given up (see request())
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
 *
 * request(frame) sends a frame that carries a request_id (a command) and resolves with the server's answer.
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
    this.ready = false; // subscribed on the current socket
    this.outbox = new Map(); // request_id -> {frame, sends, resolve}: requests the server has not answered yet
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
      this.ready = false;
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

  /** Whether a request made now goes out at once (otherwise it waits for the connection). */
  get connected() {
    return this.ready && this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /**
   * Send a frame that carries a `request_id` and keep it until the server answers: a command frame with that
   * request_id, or an error frame whose `ref` is it. The promise resolves with that frame. A request made while
   * the socket is down waits; one whose answer was lost with the connection is sent again after each
   * reconnect, with the same request_id, so the server hands back the existing command instead of creating a
   * second one. After REQUEST_SENDS_MAX unanswered sends (the request itself may be breaking the connection)
   * it resolves with an error frame of code "no_answer".
   */
  request(frame) {
    const requestId = frame.request_id;
    const known = this.outbox.get(requestId);
    if (known) return known.promise;
    const entry = { frame, sends: 0, sentOn: null, resolve: null, promise: null };
    entry.promise = new Promise((resolve) => {
      entry.resolve = resolve;
    });
    this.outbox.set(requestId, entry);
    if (this.connected) this.sendRequest(entry);
    return entry.promise;
  }

  sendRequest(entry) {
    if (entry.sends >= REQUEST_SENDS_MAX) {
      this.answer(entry.frame.request_id, {
        type: "error",
        code: "no_answer",
        message: `no answer from the gateway after ${entry.sends} attempts`,
        ref: entry.frame.request_id,
      });
      return;
    }
    if (this.send(entry.frame)) {
      entry.sends += 1;
      entry.sentOn = this.ws;
    }
  }

  /**
   * A frame the server could not read (too large, not JSON) is refused without a `ref`. The server answers a
   * socket's frames in order and only a request can be that large, so it is the oldest request still waiting
   * for its answer on this socket.
   */
  unreadableRequest(frame) {
    if (frame.ref !== undefined || !["too_large", "bad_json"].includes(frame.code)) return false;
    for (const [requestId, entry] of this.outbox) {
      if (entry.sentOn === this.ws) return this.answer(requestId, frame);
    }
    return false;
  }

  answer(requestId, frame) {
    const entry = typeof requestId === "string" ? this.outbox.get(requestId) : undefined;
    if (!entry) return false;
    this.outbox.delete(requestId);
    entry.resolve(frame);
    return true;
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
        if (!this.ready) {
          this.ready = true;
          for (const entry of [...this.outbox.values()]) this.sendRequest(entry);
        }
        if (this.catchUpTo) this.armQuietTimer(CATCH_UP_QUIET_MS);
        else this.maybeLive();
        break;
      case "pong":
        break;
      case "error":
        console.warn("gateway error frame:", frame.code, frame.message);
        if (this.answer(frame.ref, frame) || this.unreadableRequest(frame)) break; // the requester shows it
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
    // Checked before the duplicate test: the answer to a resent request can be an event already delivered.
    if (frame.type === "command" && this.outbox.size) this.answer(frame.request_id, frame);
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

// --- commands (device page) -----------------------------------------------------------------------------------

const COMMAND_NAME_RE = /^[A-Za-z0-9_-]{1,64}$/;
const COMMAND_STATES = ["pending", "sent", "succeeded", "failed", "expired", "rejected"];

/** A request_id: crypto.randomUUID() needs a secure context; plain http on a LAN address is not one. */
function newRequestId() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function truncate(text, max = COMMAND_TEXT_MAX) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function describeJson(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return `a ${typeof value}`;
}

/** A command's state as a coloured badge; only known states become a class name. */
function setStateBadge(badge, state) {
  const text = String(state ?? "unknown");
  if (badge.dataset.state === text) return;
  badge.dataset.state = text;
  badge.className = `state state-${COMMAND_STATES.includes(text) ? text : "unknown"}`;
  badge.textContent = text;
}

/** What the result column says for one command frame: its error, or its result as JSON. */
function commandOutcome(frame) {
  if (typeof frame.error === "string" && frame.error) return { text: frame.error, error: true };
  if (frame.result !== undefined && frame.result !== null) {
    let text;
    try {
      text = JSON.stringify(frame.result);
    } catch {
      text = String(frame.result);
    }
    return { text: text ?? "", error: false };
  }
  return { text: "", error: false };
}

/**
 * The command form and the "Recent commands" table. Each command keeps the id of the last frame applied to it,
 * and a frame is applied only when its id is higher: what an operator sees never goes back (pending after
 * succeeded), whatever order replay and live delivery bring frames in.
 */
class CommandPanel {
  constructor(deviceId, initial, requestRender) {
    this.deviceId = deviceId;
    this.requestRender = requestRender;
    this.socket = null;
    this.form = document.getElementById("command-form");
    this.nameInput = document.getElementById("command-name");
    this.paramsInput = document.getElementById("command-params");
    this.timeoutInput = document.getElementById("command-timeout");
    this.sendButton = document.getElementById("command-send");
    this.status = document.getElementById("command-status");
    this.error = document.getElementById("command-error");
    this.body = document.getElementById("command-rows");
    this.empty = document.getElementById("commands-empty");
    this.lastIds = new Map(); // command_id -> id of the last frame applied (outlives rows dropped from the table)
    this.entries = new Map(); // command_id -> {frame, since, tr, parts, dirty}
    this.order = []; // command ids in table order, newest first
    this.orderChanged = false;
    this.inFlight = null; // the request_id awaiting its answer; the form sends nothing else meanwhile
    if (!this.form) return;
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    for (const input of [this.nameInput, this.paramsInput, this.timeoutInput]) {
      input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
    }
    // The view sends the latest state of recent commands, newest first.
    for (const frame of Array.isArray(initial) ? initial : []) this.apply(frame, { append: true });
  }

  attach(socket) {
    this.socket = socket;
  }

  /** Fold one command frame in; returns whether it changed anything. */
  apply(frame, { append = false } = {}) {
    const commandId = frame && frame.command_id;
    if (typeof commandId !== "string" || !Number.isInteger(frame.id) || frame.device !== this.deviceId) return false;
    const last = this.lastIds.get(commandId);
    if (last !== undefined && frame.id <= last) return false; // older than what is shown: never go back
    this.lastIds.delete(commandId); // re-inserted last: the Map's order is least recently updated first
    this.lastIds.set(commandId, frame.id);
    if (this.lastIds.size > COMMAND_IDS_MAX) this.lastIds.delete(this.lastIds.keys().next().value);
    let entry = this.entries.get(commandId);
    if (!entry) {
      entry = { frame, since: frame.ts, tr: null, parts: null, dirty: true };
      this.entries.set(commandId, entry);
      if (append) this.order.push(commandId);
      else this.order.unshift(commandId); // a command new to this page is the newest one
      this.orderChanged = true;
    } else {
      entry.frame = frame;
      entry.dirty = true;
    }
    return true;
  }

  // --- the form ---

  submit() {
    if (this.inFlight) return; // a second click while the first request waits for its answer
    const command = this.readForm();
    if (!command) return;
    const frame = { op: "command", device: this.deviceId, request_id: newRequestId(), ...command };
    this.inFlight = frame.request_id;
    this.showError("");
    this.sendButton.disabled = true;
    this.form.setAttribute("aria-busy", "true");
    const waiting = !this.socket || !this.socket.connected;
    this.setStatus(waiting ? "Not connected: it will be sent when the connection is back…" : "Sending…");
    if (!this.socket) return;
    this.socket.request(frame).then((answer) => this.answered(frame, answer));
  }

  /** The command to send, from the form; null (with the reason shown) when something is not valid. */
  readForm() {
    const name = this.nameInput.value.trim();
    if (!COMMAND_NAME_RE.test(name)) {
      return this.invalid(
        this.nameInput,
        name ? "The command name may only hold letters, digits, _ and -, up to 64." : "Enter a command name.",
      );
    }
    const text = this.paramsInput.value.trim();
    let params = {};
    if (text) {
      try {
        params = JSON.parse(text);
      } catch (error) {
        return this.invalid(this.paramsInput, `Params are not valid JSON: ${error.message}`);
      }
      if (params === null || typeof params !== "object" || Array.isArray(params)) {
        return this.invalid(
          this.paramsInput,
          `Params must be a JSON object, like {"delay": 1}, not ${describeJson(params)}.`,
        );
      }
    }
    const command = { name, params };
    const timeoutText = this.timeoutInput.value.trim();
    if (this.timeoutInput.validity.badInput || timeoutText) {
      const timeout = Number(timeoutText);
      if (this.timeoutInput.validity.badInput || !Number.isFinite(timeout) || timeout < 1 || timeout > 3600) {
        return this.invalid(this.timeoutInput, "The timeout is a number of seconds from 1 to 3600, or empty.");
      }
      command.timeout = timeout;
    }
    return command;
  }

  invalid(input, message) {
    input.setAttribute("aria-invalid", "true");
    this.showError(message);
    this.setStatus("");
    input.focus();
    return null;
  }

  answered(frame, answer) {
    if (this.inFlight !== frame.request_id) return;
    this.inFlight = null;
    this.sendButton.disabled = false;
    this.form.removeAttribute("aria-busy");
    if (answer.type === "error") {
      this.setStatus("");
      this.showError(`Not sent: ${answer.message || answer.code}`);
      return;
    }
    // The answer is also a state change of the command: the table picks it up (even if it came as a duplicate).
    if (this.apply(answer)) this.requestRender();
    if (answer.state === "rejected") {
      this.setStatus("");
      this.showError(`“${frame.name}” was rejected: ${answer.error || "refused by the gateway"}`);
    } else {
      this.setStatus(`“${frame.name}” accepted: its state is under Recent commands.`);
    }
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = !message;
  }

  setStatus(message) {
    this.status.textContent = message;
  }

  // --- the table ---

  render() {
    if (!this.body) return;
    if (this.orderChanged) {
      for (const dropped of this.order.splice(COMMANDS_MAX)) this.entries.delete(dropped);
      this.body.replaceChildren(...this.order.map((commandId) => this.row(commandId).tr));
      this.orderChanged = false;
    }
    for (const entry of this.entries.values()) {
      if (entry.dirty) this.renderRow(entry);
    }
    this.empty.hidden = this.order.length > 0;
  }

  row(commandId) {
    const entry = this.entries.get(commandId);
    if (entry.tr) return entry;
    const tr = el("tr");
    tr.dataset.commandId = commandId;
    const time = el("td", "col-time");
    const name = el("td", "col-name mono");
    const stateCell = el("td", "col-state");
    const badge = el("span", "state");
    stateCell.append(badge);
    const outcome = el("td", "outcome");
    tr.append(time, name, stateCell, outcome);
    entry.tr = tr;
    entry.parts = { time, name, badge, outcome };
    return entry;
  }

  renderRow(entry) {
    const { frame, parts } = this.row(entry.frame.command_id);
    entry.dirty = false;
    entry.tr.dataset.state = String(frame.state);
    parts.time.textContent = clockTime(entry.since);
    parts.time.title = absoluteTime(entry.since);
    parts.name.textContent = String(frame.name ?? "");
    setStateBadge(parts.badge, frame.state);
    parts.badge.title = typeof frame.ts === "number" ? `since ${absoluteTime(frame.ts)}` : "";
    const { text, error } = commandOutcome(frame);
    parts.outcome.textContent = truncate(text);
    parts.outcome.title = text.length > COMMAND_TEXT_MAX ? truncate(text, 2_000) : "";
    parts.outcome.classList.toggle("outcome-error", error);
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
    this.metricsKey = null; // nothing rendered yet: the first render also shows or hides "No telemetry yet"
    this.eventIds = new Set();
    this.pendingEvents = [];
    this.pendingNotes = [];
    this.scheduler = new RenderScheduler(() => this.flush());
    this.commands = new CommandPanel(this.device.id, state.commands, () => this.scheduler.request());
    for (const frame of Array.isArray(state.events) ? state.events : []) this.queueEvent(frame);
    this.flush();
    setInterval(() => this.tickClock(), CLOCK_INTERVAL_MS);
  }

  get subscription() {
    return [this.device.id];
  }

  attach(socket) {
    this.commands.attach(socket);
  }

  onEvent(frame) {
    if (frame.device !== this.device.id) return;
    this.device.apply(frame);
    if (frame.type === "command") this.commands.apply(frame);
    this.queueEvent(frame);
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
    this.commands.render();
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
        const badge = el("span", "state");
        setStateBadge(badge, frame.state);
        detail.append(el("span", "event-name", frame.name), badge);
        const { text, error } = commandOutcome(frame);
        if (text) detail.append(el("span", error ? "event-result outcome-error" : "event-result", truncate(text)));
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
  if (page.attach) page.attach(socket);
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
