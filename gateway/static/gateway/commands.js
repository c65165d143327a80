// The device page's command panel: the form that sends a command over the socket, and the recent commands.

import { absoluteTime, clockTime, el } from "./dom.js";

const COMMANDS_MAX = 50;
const COMMAND_IDS_MAX = 1_000;
const COMMAND_TEXT_MAX = 200;

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

export function truncate(text, max = COMMAND_TEXT_MAX) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function describeJson(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return `a ${typeof value}`;
}

/** A command's state as a coloured badge; only known states become a class name. */
export function setStateBadge(badge, state) {
  const text = String(state ?? "unknown");
  if (badge.dataset.state === text) return;
  badge.dataset.state = text;
  badge.className = `state state-${COMMAND_STATES.includes(text) ? text : "unknown"}`;
  badge.textContent = text;
}

/** What the result column says for one command frame: its error, or its result as JSON. */
export function commandOutcome(frame) {
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
export class CommandPanel {
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
