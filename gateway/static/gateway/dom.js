// Formatting and DOM helpers shared by the console's pages.
//
// Safety rule for every console module: a device-provided string (ids, names, metric names, values, event names
// and messages) reaches the page through textContent or an attribute set with setAttribute, never through
// innerHTML or an HTML string.

const RENDER_INTERVAL_MS = 250;

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
export const compareText = (a, b) => collator.compare(a, b) || (a < b ? -1 : a > b ? 1 : 0);

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

export function formatValue(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "number") {
    return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(12)));
  }
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

const numberFormat = new Intl.NumberFormat();

export function formatCount(n) {
  return numberFormat.format(n);
}

export function plural(n, word, words = `${word}s`) {
  return `${formatCount(n)} ${n === 1 ? word : words}`;
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

export function absoluteTime(ts) {
  return typeof ts === "number" ? dateTimeFormat.format(new Date(ts * 1000)) : "";
}

export function clockTime(ts) {
  return typeof ts === "number" ? clockFormat.format(new Date(ts * 1000)) : "";
}

/** Fill a <time>-holding cell with a relative time (absolute time on hover). */
export function setTime(cell, ts) {
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

export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

export function setBadge(badge, online) {
  const value = online ? "true" : "false";
  if (badge.dataset.online !== value) {
    badge.dataset.online = value;
    badge.textContent = online ? "online" : "offline";
  }
}

/**
 * Runs `render` at most once per RENDER_INTERVAL_MS, in an animation frame, however often it is asked:
 * thousands of events per second become a few DOM updates per second.
 */
export class RenderScheduler {
  constructor(render, interval = RENDER_INTERVAL_MS) {
    this.render = render;
    this.interval = interval;
    this.pending = false;
    this.last = 0;
  }

  request() {
    if (this.pending) return;
    this.pending = true;
    const wait = Math.max(0, this.last + this.interval - performance.now());
    setTimeout(() => {
      requestAnimationFrame(() => {
        this.pending = false;
        this.last = performance.now();
        this.render();
      });
    }, wait);
  }
}

/**
 * A progress indicator for a load that may take a while: shown only if the load is still running after
 * `delay` ms (no flicker for fast ones). `node` holds a <progress> and a text element (.progress-text).
 */
export class LoadProgress {
  constructor(node, delay = 200) {
    this.node = node;
    this.bar = node ? node.querySelector("progress") : null;
    this.text = node ? node.querySelector(".progress-text") : null;
    this.delay = delay;
    this.timer = null;
  }

  start(text) {
    if (!this.node) return;
    clearTimeout(this.timer);
    this.update(text);
    if (this.bar) this.bar.removeAttribute("value"); // indeterminate until told otherwise
    this.node.setAttribute("aria-busy", "true");
    this.timer = setTimeout(() => {
      this.node.hidden = false;
    }, this.delay);
  }

  update(text, done, total) {
    if (!this.node) return;
    if (this.text && text) this.text.textContent = text;
    if (this.bar && Number.isFinite(done) && Number.isFinite(total) && total > 0) {
      this.bar.max = total;
      this.bar.value = done;
    }
  }

  stop() {
    if (!this.node) return;
    clearTimeout(this.timer);
    this.node.hidden = true;
    this.node.removeAttribute("aria-busy");
  }
}
