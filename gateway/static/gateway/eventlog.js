// The device page's event log: recent events newest first, live, with filters by kind and severity.
//
// Filters: when only device-event severities are chosen (no telemetry, status or commands), the log holds what the
// server has of those severities (GET /api/devices/<id>/events?severity=..., paged with "Load older"), so older
// alerts show up even behind a flood of telemetry. Otherwise it holds the newest events of every kind (the page's
// state, or GET /api/devices/<id> after a reload) and hides the unchosen kinds (CSS, by the table's data-hide).

import { commandOutcome, setStateBadge, truncate } from "./commands.js";
import { LoadProgress, absoluteTime, clockTime, compareText, el, formatValue, setBadge } from "./dom.js";

const ROWS_MAX = 500;
const PAGE = 50;
const NOTES_MAX = 10;
const SEVERITIES = ["info", "warning", "critical"];
const KINDS = ["telemetry", "status", "command", ...SEVERITIES];

/** A frame's filter kind: its type, or its severity for device events. */
function kindOf(frame) {
  if (frame.type !== "event") return String(frame.type);
  return SEVERITIES.includes(frame.severity) ? frame.severity : "info";
}

export class EventLog {
  constructor({ api, deviceId, root, initial }) {
    this.api = api;
    this.deviceId = deviceId;
    this.table = root.querySelector("table");
    this.body = root.querySelector("tbody");
    this.empty = root.querySelector(".log-empty");
    this.filters = root.querySelector(".log-filters");
    this.older = root.querySelector(".log-older");
    this.progress = new LoadProgress(root.querySelector(".log-progress"));
    this.ids = new Set();
    this.pending = [];
    this.notes = []; // gap and error notes, kept across reloads (a reload empties the table)
    this.chosen = new Set(KINDS);
    this.severities = null; // the severities asked of the server; null: every kind
    this.loads = 0;
    this.filters.addEventListener("change", () => this.filterChanged());
    this.older.addEventListener("click", () => this.loadOlder());
    for (const frame of Array.isArray(initial) ? initial : []) this.add(frame);
    this.older.hidden = true; // paging is for severities (the events API), see filterChanged
  }

  /** Queue a frame (live or loaded) for the next render; frames the current filter excludes are skipped. */
  add(frame) {
    if (!Number.isInteger(frame.id) || this.ids.has(frame.id)) return;
    if (this.severities && !this.severities.includes(kindOf(frame))) return;
    this.pending.push(frame);
    if (this.pending.length > ROWS_MAX * 2) {
      // A flood: only the newest ROWS_MAX can ever be shown.
      this.pending.sort((a, b) => b.id - a.id);
      this.pending.length = ROWS_MAX;
    }
  }

  render() {
    const fresh = this.pending.sort((a, b) => b.id - a.id);
    this.pending = [];
    for (const frame of fresh) {
      if (this.ids.has(frame.id)) continue;
      this.insertRow(eventRow(frame), frame.id);
      this.ids.add(frame.id);
    }
    for (const note of this.notes) if (!note.isConnected) this.insertRow(note, Number(note.dataset.id));
    while (this.body.children.length > ROWS_MAX) {
      const last = this.body.lastElementChild;
      this.ids.delete(Number(last.dataset.id));
      this.notes = this.notes.filter((note) => note !== last);
      last.remove();
    }
    this.updateEmpty();
  }

  updateEmpty() {
    let visible = 0;
    for (const row of this.body.children) if (this.chosen.has(row.dataset.kind)) visible += 1;
    const filtered = this.severities !== null || this.chosen.size < KINDS.length;
    this.empty.textContent = filtered ? "No events match these filters." : "No events yet.";
    this.empty.hidden = visible > 0;
  }

  insertRow(tr, id) {
    // Newest first; events normally arrive in id order, so the right place is almost always the top.
    let before = this.body.firstElementChild;
    while (before && Number(before.dataset.id) > id) before = before.nextElementSibling;
    this.body.insertBefore(tr, before);
  }

  // --- filters and loading ---

  filterChanged() {
    const boxes = [...this.filters.querySelectorAll("input[type=checkbox]")];
    this.chosen = new Set(boxes.filter((box) => box.checked).map((box) => box.value));
    this.table.dataset.hide = KINDS.filter((kind) => !this.chosen.has(kind)).join(" ");
    const onlySeverities = this.chosen.size > 0 && [...this.chosen].every((kind) => SEVERITIES.includes(kind));
    const wanted = onlySeverities ? SEVERITIES.filter((kind) => this.chosen.has(kind)) : null;
    if (String(wanted) !== String(this.severities)) {
      this.severities = wanted;
      this.reload();
    } else {
      this.updateEmpty();
    }
  }

  /** The newest events the filter asks for: of those severities, or of every kind. */
  async fetchNewest() {
    if (this.severities) {
      const answer = await this.api.events(this.deviceId, { severity: this.severities.join(","), limit: PAGE });
      return { events: answer.events, more: answer.events?.length >= PAGE };
    }
    const answer = await this.api.device(this.deviceId);
    return { events: answer.events, more: false };
  }

  /** Replace the rows with the newest events that match the filter (after a filter change, a gap, an ack). */
  async reload() {
    const generation = (this.loads += 1);
    this.progress.start("Loading events…");
    try {
      const { events, more } = await this.fetchNewest();
      if (generation !== this.loads) return;
      this.body.replaceChildren();
      this.ids.clear();
      this.pending = [];
      this.take(events, more);
    } catch (error) {
      if (generation === this.loads) this.failed(error);
    } finally {
      if (generation === this.loads) this.progress.stop();
    }
  }

  async loadOlder() {
    const oldest = Math.min(...this.ids);
    if (!Number.isFinite(oldest) || !this.severities) return;
    const generation = this.loads;
    this.older.disabled = true;
    this.progress.start("Loading older events…");
    try {
      const query = { severity: this.severities.join(","), limit: PAGE, before: oldest };
      const answer = await this.api.events(this.deviceId, query);
      if (generation === this.loads) this.take(answer.events, answer.events?.length >= PAGE);
    } catch (error) {
      this.failed(error);
    } finally {
      this.older.disabled = false;
      this.progress.stop();
    }
  }

  take(events, more) {
    for (const frame of Array.isArray(events) ? events : []) this.add(frame);
    this.older.hidden = !more;
    this.render();
  }

  failed(error) {
    if (error.name === "AbortError" || error.name === "SignedOut") return;
    this.note(Number.MAX_SAFE_INTEGER, `Events could not be loaded: ${error.message}`);
    this.render();
  }

  note(id, text) {
    this.notes.push(noteRow(id, text));
    if (this.notes.length > NOTES_MAX) this.notes.shift().remove();
  }

  /** Some live events were lost (a gap): say so where they belong, and load the log again. */
  gap(from, to) {
    this.note(to + 0.5, `Some live events (ids ${from}–${to}) were missed here; the log was reloaded from history.`);
    return this.reload();
  }
}

function noteRow(id, text) {
  const note = el("tr", "gap-note");
  note.dataset.id = String(id); // sorts just above the range it is about
  note.dataset.kind = "gap";
  const cell = el("td", "", text);
  cell.colSpan = 3;
  note.append(cell);
  return note;
}

function eventRow(frame) {
  const tr = el("tr");
  tr.dataset.id = String(frame.id);
  tr.dataset.type = String(frame.type);
  tr.dataset.kind = kindOf(frame);
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
      typeCell.append(el("span", `tag tag-${kindOf(frame)}`, String(frame.severity ?? "event")));
      detail.append(el("span", "event-name", frame.name));
      if (typeof frame.message === "string" && frame.message) {
        detail.append(el("span", "event-message", frame.message));
      }
      if (frame.data && typeof frame.data === "object" && Object.keys(frame.data).length) {
        detail.append(el("code", "event-data", JSON.stringify(frame.data)));
      }
      if (frame.acknowledged && typeof frame.acknowledged === "object") {
        const { by, at } = frame.acknowledged;
        const ack = el("span", "event-ack", `acknowledged${by ? ` by ${by}` : ""}`);
        ack.title = absoluteTime(at);
        detail.append(ack);
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
